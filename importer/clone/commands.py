"""The command-line side of clones: `clone-source` (a token in hand) and `move` (the token fetched by a command)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from importer.errors import ConfigError
from importer.progress_bar import TransferProgress
from importer.units import parse_duration
from importer.upload_client import read_token

TOKEN_COMMAND_TIMEOUT = 60.0


def add_arguments(parser: argparse.ArgumentParser, move: bool) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--volume", help="the volume's ID in this node's pools (--datadir or --config)")
    what.add_argument("--path", type=Path, help="a filesystem volume's directory, or a block device or image file")
    pools = parser.add_mutually_exclusive_group()
    pools.add_argument("--datadir", help='the driver\'s pools as JSON: [{"name": ..., "path": ...}]')
    pools.add_argument("--config", type=Path, help="the driver's HostPathProvisioner CR file (YAML)")
    parser.add_argument("--url", required=True, help="https://HOST:PORT of the target node's upload daemon (or an "
                        "upload server)")
    token = parser.add_mutually_exclusive_group(required=True)
    if move:
        token.add_argument("--token-command", help="a command printing the target volume's upload token, e.g. "
                           "'ssh node2 hpp-importer upload-token VOLUME'")
    token.add_argument("--token", help="the target volume's upload token")
    token.add_argument("--token-file", type=Path, help="file holding the token")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--ca", type=Path, help="PEM CA certificate of the target [system store]")
    trust.add_argument("--insecure", action="store_true", help="do not verify the target's certificate")
    parser.add_argument("--compress", action="store_true", help="zstd on the wire (worth it on slow links)")
    parser.add_argument("--preallocation", action="store_true", help="ask the target to allocate the whole disk")
    parser.add_argument("--wait-ready", default="60s", help="retry a busy or absent target this long [60s]")
    parser.add_argument("--stall-timeout", default="60s", help="fail when the target takes no data this long [60s]")
    parser.add_argument("--connect-timeout", default="10s", help="TCP connect and TLS handshake [10s]")
    parser.add_argument("--response-timeout", default="10m", help="wait for the answer after the last byte [10m]")
    parser.add_argument("--retries", type=int, default=5, help="resume after a broken connection this many times [5]")
    parser.add_argument("--progress-interval", default="10s", help="time between progress lines off a terminal")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")


def token_from(args: argparse.Namespace) -> str:
    command = getattr(args, "token_command", None)
    if command is None:
        return read_token(args.token, args.token_file)
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=TOKEN_COMMAND_TIMEOUT,
                              check=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot run the token command {command!r}: {err}") from err
    except subprocess.TimeoutExpired as err:
        raise ConfigError(f"the token command {command!r} took over {TOKEN_COMMAND_TIMEOUT:g} s") from err
    if done.returncode != 0:
        raise ConfigError(f"the token command {command!r} failed ({done.returncode}): {done.stderr.strip()[:300]}")
    return read_token(done.stdout, None)


def run(args: argparse.Namespace) -> int:
    """Open the source, stream it, print one line; 1 and one error line on failure."""
    from hpp_csi.config import ConfigError as PoolConfigError
    from hpp_csi.config import load_cr, parse_datadir
    from hpp_csi.storage.pools import StoragePool
    from importer.clone.client import CloneRequest, CloneSender
    from importer.clone.source import open_path, open_volume
    from importer.errors import ImporterError

    def fail(message: str) -> int:
        print(f"hpp-importer: error: {message}", file=sys.stderr)
        return 1

    try:
        request = CloneRequest(
            url=args.url, token=token_from(args), ca_file=args.ca, insecure=args.insecure, compress=args.compress,
            preallocation=args.preallocation, wait_ready=parse_duration(args.wait_ready, "--wait-ready"),
            stall_timeout=parse_duration(args.stall_timeout, "--stall-timeout"),
            connect_timeout=parse_duration(args.connect_timeout, "--connect-timeout"),
            response_timeout=parse_duration(args.response_timeout, "--response-timeout"), retries=max(0, args.retries))
        progress = None if args.no_progress else TransferProgress(
            sys.stderr, parse_duration(args.progress_interval, "--progress-interval"))
        sender = CloneSender(request, progress, notice=lambda text: print(f"hpp-importer: {text}", file=sys.stderr))
        if args.volume is not None:
            if not (args.datadir or args.config):
                raise ConfigError("--volume needs the pools: --datadir JSON or --config CR.yaml")
            configs = parse_datadir(args.datadir) if args.datadir else load_cr(args.config)
            source = open_volume([StoragePool(p) for p in configs], args.volume)
            what = f"volume {args.volume}"
        else:
            source = open_path(args.path)
            what = str(args.path)
        try:
            outcome = sender.run(source)
        finally:
            source.close()
    except (ImporterError, PoolConfigError) as err:
        return fail(str(err))
    except OSError as err:
        return fail(f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else ""))
    except KeyboardInterrupt:
        return fail("clone interrupted") + 129
    print(outcome.summary(what, sender.url))
    return 0
