"""Which redirects an importer follows: to http(s) URLs with a host, never around a loop."""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

from importer.errors import SourceError


def next_hop(url: str, status: int, location: str, chain: list[str]) -> str:
    """Where a redirect leads; only to http(s) and never back to a URL already visited."""
    try:
        target = urljoin(url, location)
        parts = urlsplit(target)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port or bracket: not a URL we can follow
        valid = False
    if not valid:
        raise SourceError(f"refusing redirect from {url} (HTTP {status}) to {location!r}: only http:// and https:// "
                          "URLs with a host are followed")
    if target in chain:
        raise SourceError(f"redirect loop: {' -> '.join([*chain[chain.index(target):], target])}")
    return target
