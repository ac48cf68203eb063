"""Writes one benchmark's figures into its own section of docs/benchmarks.md, leaving the others alone."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nFigures written by `make bench` (each script owns one section; rerun it to refresh).\n"


def machine_line() -> str:
    """Where and when the figures were taken, so numbers from different machines are not compared blindly."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"_{now} on {platform.node() or 'unknown'}: {os.cpu_count()} cores, Python {platform.python_version()}_"


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
