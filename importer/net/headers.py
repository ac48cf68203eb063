"""Extra HTTP headers: CDI's IMPORTER_EXTRA_HEADER_<n> values and its secret headers, one file per header."""

from __future__ import annotations

import os
from pathlib import Path

from importer.errors import ConfigError

# CDI mounts each Secret named in secretExtraHeaders at /extraheaders/<index>; every key is a file `Name: value`.
CDI_SECRET_HEADERS_DIR = Path("/extraheaders")
MAX_HEADER_FILE = 64 * 1024


def split_header(text: str) -> tuple[str, str] | None:
    """(name, value) of `Name: value`, or None when it is not one header line."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or any(c in name for c in " \t\r\n") or "\n" in value or "\r" in value:
        return None
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
        return None
    return name.strip(), value.strip()


def parse_header(text: str) -> tuple[str, str]:
    """`Name: value` as IMPORTER_EXTRA_HEADER_<n> or --extra-header carries it (not secret: quoted in errors)."""
    header = split_header(text)
    if header is None:
        raise ConfigError(f"invalid extra header {text!r}: expected 'Name: value'")
    return header


def secret_headers(directory: Path) -> list[tuple[str, str]]:
    """Every header file under directory, walked in name order as CDI walks it; dot-names (..data) skipped.

    A file that is not one `Name: value` line is an error naming the file, never showing its content."""
    if not directory.exists():
        return []
    root = directory.resolve()
    headers: list[tuple[str, str]] = []
    for path in _walk(directory):
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            raise ConfigError(f"secret extra header {path} points outside {directory}")
        if not resolved.is_file():  # a FIFO would block, a directory cannot be read
            raise ConfigError(f"secret extra header {path} is not a regular file")
        try:
            with resolved.open("rb") as f:
                data = f.read(MAX_HEADER_FILE + 1)
        except OSError as err:
            raise ConfigError(f"cannot read secret extra header {path}: {err.strerror or err}") from err
        if len(data) > MAX_HEADER_FILE:
            raise ConfigError(f"secret extra header {path} is larger than {MAX_HEADER_FILE} bytes")
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = ""
        header = split_header(text)
        if header is None:
            raise ConfigError(f"secret extra header {path} is not one 'Name: value' line")
        headers.append(header)
    return headers


def _walk(directory: Path) -> list[Path]:
    """Non-directory entries depth first in lexical order (Go's filepath.Walk); symlinked dirs are not entered."""
    found: list[Path] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as err:
        raise ConfigError(f"cannot list secret extra headers in {directory}: {err.strerror or err}") from err
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            found.extend(_walk(path))
        else:
            found.append(path)
    return found
