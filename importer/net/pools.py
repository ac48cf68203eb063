"""urllib3 connection pools for one import: direct, or through the proxy CDI's environment names for that URL."""

from __future__ import annotations

import threading

import urllib3

from importer.net.proxy import Proxy, ProxySettings
from importer.net.tls import TlsSettings

USER_AGENT = "hpp-importer"
MAX_CONNECTIONS_PER_HOST = 32  # above our parallel Range readers, so urllib3 never discards a connection


def pool_for(url: str, tls: TlsSettings, proxy: ProxySettings | None, timeout: float) -> urllib3.PoolManager:
    """A pool for url: a ProxyManager (CONNECT for https://) unless NO_PROXY or loopback says to go direct."""
    chosen = proxy.proxy_for(url) if proxy is not None else None
    return manager(chosen, tls, timeout)


def manager(proxy: Proxy | None, tls: TlsSettings, timeout: float) -> urllib3.PoolManager:
    """A PoolManager that never retries nor follows redirects: callers decide both (resume, credentials)."""
    verify: dict[str, object] = {"ssl_context": tls.origin_context()}
    if tls.insecure:
        verify.update(cert_reqs="CERT_NONE", assert_hostname=False)
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # asked for; a warning per request is noise
    common = dict(num_pools=8, maxsize=MAX_CONNECTIONS_PER_HOST, retries=False,
                  timeout=urllib3.Timeout(connect=timeout, read=timeout), **verify)
    if proxy is None:
        return urllib3.PoolManager(**common)  # type: ignore[arg-type]
    headers = {"User-Agent": USER_AGENT}
    if proxy.username is not None:
        headers.update(urllib3.make_headers(proxy_basic_auth=f"{proxy.username}:{proxy.password or ''}"))
    proxy_tls = tls.proxy_context() if proxy.scheme == "https" else None
    return urllib3.ProxyManager(proxy.url, proxy_headers=headers, proxy_ssl_context=proxy_tls,
                                **common)  # type: ignore[arg-type]


class Pools:
    """One manager per route (direct or each proxy), reused across the redirects and ranges of one import."""

    def __init__(self, tls: TlsSettings, proxy: ProxySettings | None, timeout: float) -> None:
        self.tls, self.proxy, self.timeout = tls, proxy, timeout
        self._managers: dict[Proxy | None, urllib3.PoolManager] = {}
        self._lock = threading.Lock()  # parallel Range readers ask at once

    def route(self, url: str) -> Proxy | None:
        return self.proxy.proxy_for(url) if self.proxy is not None else None

    def for_url(self, url: str) -> urllib3.PoolManager:
        chosen = self.route(url)
        with self._lock:
            if chosen not in self._managers:
                self._managers[chosen] = manager(chosen, self.tls, self.timeout)
            return self._managers[chosen]

    def clear(self) -> None:
        with self._lock:
            for pool in self._managers.values():
                pool.clear()
            self._managers.clear()
