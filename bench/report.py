"""Writes one benchmark's figures into its own section of docs/benchmarks.md, leaving the others alone."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nFigures written by `make bench` (each script owns one section; rerun it to refresh).\n"


VIRTIO_BALLOON = Path("/sys/bus/virtio/drivers/virtio_balloon")
BALLOON_F_REPORTING = 5  # virtio-balloon feature bit: free page reporting


def returns_free_memory() -> bool:
    """Whether this VM hands memory it frees back to its host (virtio-balloon free page reporting).

    There, memory freed a few seconds ago (a deleted file's page cache) is faulted back in by the hypervisor when
    used again: writing to new page cache costs system time that varies from run to run, and a route that writes
    more bytes (scratch, then the target) pays more of it.
    """
    for device in VIRTIO_BALLOON.glob("virtio*"):
        try:
            features = (device / "features").read_text().strip()
        except OSError:
            continue
        if len(features) > BALLOON_F_REPORTING and features[BALLOON_F_REPORTING] == "1":
            return True
    return False


def machine_line() -> str:
    """Where and when the figures were taken, so numbers from different machines are not compared blindly."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    memory = ", a VM that returns freed memory to its host (free page reporting)" if returns_free_memory() else ""
    return (f"_{now} on {platform.node() or 'unknown'}: {os.cpu_count()} cores, Python {platform.python_version()}"
            f"{memory}_")


def update_section(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section between `<!-- BEGIN name -->` and `<!-- END name -->`."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n\n{machine_line()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
