"""CDI's import proxy: which proxy, if any, a URL goes through, decided as Go's httpproxy.FromEnvironment does.

CDI's importer is Go, so the variables mean what Go makes of them: the upper-case name wins over the lower-case
one when both are set, https:// URLs use only HTTPS_PROXY (no fallback to HTTP_PROXY), localhost and loopback
addresses never go through a proxy, and NO_PROXY lists hosts, `.suffix`/`*.suffix` domains, IPs, CIDRs, any of
them with `:port`, or `*` for everything.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from importer.errors import ConfigError

DEFAULT_PORTS = {"http": 80, "https": 443}
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Proxy:
    """One proxy server; credentials are kept apart so that str() and logs never show them."""

    scheme: str  # http or https: how we talk to the proxy itself
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        """scheme://host:port, without credentials: what urllib3, nbdkit and messages get."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_proxy(text: str, variable: str) -> Proxy:
    """A proxy URL as Go reads it: `host:port` alone means http://host:port; `user:pass@` becomes credentials."""
    value = text.strip()
    if "://" not in value:
        value = "http://" + value
    try:
        parts = urlsplit(value)
        port = parts.port
        host = parts.hostname
    except ValueError as err:
        raise ConfigError(f"invalid proxy in {variable}: {err}") from err
    scheme = parts.scheme.lower()
    if scheme == "socks5":
        raise ConfigError(f"{variable}: SOCKS5 proxies are not supported, only http:// and https:// proxies")
    if scheme not in DEFAULT_PORTS or not host:
        raise ConfigError(f"invalid proxy in {variable}: expected http://HOST[:PORT] or https://HOST[:PORT]")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(scheme, host, port or DEFAULT_PORTS[scheme], username, password)


@dataclass(frozen=True)
class _Rule:
    """One NO_PROXY entry: a network (for IPs) or a domain suffix, optionally limited to one port."""

    network: IpNetwork | None = None
    domain: str = ""  # with its leading dot
    exact_too: bool = False  # "example.com" also matches example.com itself; ".example.com" only subdomains
    port: int | None = None

    def matches(self, host: str, port: int, ip: IpAddress | None) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        return host.endswith(self.domain) or (self.exact_too and host == self.domain[1:])


def parse_no_proxy(text: str) -> tuple[bool, list[_Rule]]:
    """(everything bypassed, rules); entries Go cannot read are skipped as Go skips them."""
    rules: list[_Rule] = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True, []
        if "/" in entry:
            try:
                rules.append(_Rule(network=ipaddress.ip_network(entry, strict=False)))
            except ValueError:
                pass  # Go's ParseCIDR fails and the entry is then read as a (useless) host name
            else:
                continue
        host, port = _split_host_port(entry)
        if host is None:
            continue
        try:
            rules.append(_Rule(network=ipaddress.ip_network(host), port=port))
            continue
        except ValueError:
            pass
        if host.startswith("*."):
            host = host[1:]
        exact_too = not host.startswith(".")
        rules.append(_Rule(domain=host if host.startswith(".") else "." + host, exact_too=exact_too, port=port))
    return False, rules


def _split_host_port(entry: str) -> tuple[str | None, int | None]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address; (None, None) for an entry with no host."""
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or not host:
            return None, None
        port_text = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
        if not host:
            return None, None
    else:
        host, port_text = entry, ""  # no port, or a bare IPv6 address
    if port_text and not (port_text.isascii() and port_text.isdigit()):
        return None, None
    return host, int(port_text) if port_text else None


@dataclass(frozen=True)
class ProxySettings:
    """HTTP_PROXY, HTTPS_PROXY and NO_PROXY, already parsed; proxy_for() answers per URL."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: str = ""
    _bypass_all: bool = field(default=False, init=False, repr=False)
    _rules: tuple[_Rule, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        everything, rules = parse_no_proxy(self.no_proxy)
        object.__setattr__(self, "_bypass_all", everything)
        object.__setattr__(self, "_rules", tuple(rules))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxySettings:
        """Go's FromEnvironment: for each pair the first non-empty of UPPER and lower case."""
        def first(*names: str) -> tuple[str, str]:
            for name in names:
                if env.get(name, ""):
                    return name, env[name]
            return names[0], ""

        http_name, http_value = first("HTTP_PROXY", "http_proxy")
        https_name, https_value = first("HTTPS_PROXY", "https_proxy")
        return cls(
            http=parse_proxy(http_value, http_name) if http_value.strip() else None,
            https=parse_proxy(https_value, https_name) if https_value.strip() else None,
            no_proxy=first("NO_PROXY", "no_proxy")[1],
        )

    def proxy_for(self, url: str) -> Proxy | None:
        """The proxy a request for url goes through, or None to connect directly."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        if proxy is None or not parts.hostname:
            return None
        host = parts.hostname.lower()
        port = parts.port or DEFAULT_PORTS[scheme]
        return None if self.bypassed(host, port) else proxy

    def bypassed(self, host: str, port: int) -> bool:
        """True when host:port is reached directly: loopback, localhost, or a NO_PROXY match."""
        host = host.strip("[]").lower()
        try:
            ip: IpAddress | None = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if host == "localhost" or (ip is not None and ip.is_loopback):
            return True
        if self._bypass_all:
            return True
        return any(rule.matches(host, port, ip) for rule in self._rules)
