"""A node for upload tests: a real `hpp-csi serve` with its pools and a real `hpp-importer serve` on them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from drivertools import Driver, make_root, unique
from impkit import MiB
from uploadkit import HPP_IMPORTER, Certs, curl

_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)(?:, healthz on 127\.0\.0\.1:(\d+))?; "
                        r"TLS certificate (\S+) SHA-256 fingerprint ([0-9A-F:]+)")


class Daemon:
    """`hpp-importer serve` on the driver's pools, a self-signed pair made beside its key file."""

    def __init__(self, driver: Driver, key_file: Path, *args: str, ca: Path | None = None) -> None:
        self.key_file = key_file
        self.log_path = key_file.parent.parent / f"daemon-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w+")
        pools = ["--config", str(driver.config)] if driver.config else ["--datadir", json.dumps(driver.datadir())]
        cmd = [HPP_IMPORTER, "serve", *pools, "--listen", "127.0.0.1:0", "--key-file", str(key_file), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log,
                                     env={"PATH": os.environ["PATH"]})
        end = time.monotonic() + 15
        while not (found := _LISTENING.search(self.log())):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.close()
                raise AssertionError(f"upload daemon did not start: {self.log()}")
            time.sleep(0.05)
        self.port, self.cert, self.fingerprint = int(found.group(1)), Path(found.group(3)), found.group(4)
        self.healthz_port = int(found.group(2)) if found.group(2) else None
        ca = ca or self.cert  # a self-signed certificate is its own CA
        self.certs = Certs(ca, self.cert, self.cert, ca, ca)  # curl only reads `ca`

    def log(self) -> str:
        return self.log_path.read_text()

    def curl(self, path: str, *args: str, token: str | None = None) -> tuple[int, str]:
        auth = ["-H", f"Authorization: Bearer {token}"] if token is not None else []
        status, body, _ = curl(self.certs, self.port, path, *auth, *args)
        return status, body

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass
class Node:
    driver: Driver
    daemon: Daemon
    key_file: Path

    def token(self, volume_id: str, *args: str) -> str:
        done = subprocess.run([HPP_IMPORTER, "upload-token", volume_id, "--key-file", str(self.key_file), *args],
                              capture_output=True, text=True, check=True)
        return done.stdout.strip()

    def volume(self, size: int = 16 * MiB, block: bool = False) -> tuple[str, Path]:
        volume_id = self.driver.create(unique("up"), size, block=block).volume_id
        return volume_id, self.driver.volume_path(volume_id)


@contextlib.contextmanager
def started_node(*daemon_args: str) -> Iterator[Node]:
    """A driver on a fresh root and the daemon on its pools; both stopped, and the root removed, afterwards."""
    root = make_root("hppup-")
    driver = Driver(root)
    daemon = None
    try:
        driver.start()
        key_file = root / "keys" / "upload-signing.key"
        daemon = Daemon(driver, key_file, *daemon_args)
        yield Node(driver, daemon, key_file)
    finally:
        if daemon is not None:
            daemon.close()
        driver.shutdown()  # unmounts, detaches its loop devices and removes root
