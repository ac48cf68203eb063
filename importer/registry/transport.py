"""Requests to one registry: scheme choice (TLS, or plain HTTP only when insecure), auth challenges, redirects.

Errors become RegistryError messages that name the registry and say what to change.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

from importer.net.pools import USER_AGENT, Pools
from importer.net.redirects import next_hop
from importer.registry import auth
from importer.registry.errors import RegistryError, RegistryUnauthorized
from importer.registry.options import RegistryOptions

CREDENTIALS_HINT = "check IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY"
_REDIRECTS = (301, 302, 303, 307, 308)
_PLAIN_HTTP_SIGNS = ("wrong version number", "record layer failure", "packet length too long", "unknown protocol",
                     "http request")
MAX_ERROR_BODY = 64 * 1024


class Transport:
    """GETs against one registry with its Authorization, which never follows a redirect to another host."""

    def __init__(self, host: str, repository: str, options: RegistryOptions, pools: Pools) -> None:
        self.host, self.repository, self.options, self.pools = host, repository, options, pools
        self.base: str | None = None  # "https://host" or "http://host" once the ping chose
        self._authorization: str | None = None
        self._challenge: auth.Challenge | None = None

    # -- connection set-up ----------------------------------------------------------------------------

    def ping(self) -> None:
        """GET /v2/ picks the scheme and learns the auth challenge, as docker clients do."""
        if self.base is not None:
            return
        try:
            resp = self._send(f"https://{self.host}/v2/", {})
            self.base = f"https://{self.host}"
        except RegistryError as err:
            if not isinstance(err.__cause__, SSLError) or not _speaks_plain_http(err.__cause__):
                raise
            if not self.options.insecure:
                raise RegistryError(f"registry {self.host} does not speak TLS (a plain-HTTP registry?): set "
                                    "INSECURE_TLS to allow plain HTTP") from err
            resp = self._send(f"http://{self.host}/v2/", {})
            self.base = f"http://{self.host}"
        with contextlib.closing(resp):
            if resp.status == 401:
                self._answer(resp)
            elif resp.status != 200:
                raise RegistryError(f"{self.host} is not a container registry: GET /v2/ answered HTTP {resp.status}"
                                    f"{error_detail(resp)}")

    def _answer(self, resp: urllib3.BaseHTTPResponse) -> None:
        """Prepare the Authorization for a 401's challenge: basic credentials, or a token from the realm."""
        challenges = auth.parse_challenges(resp.headers.getlist("WWW-Authenticate"))
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or \
            next((c for c in challenges if c.scheme == "basic"), None)
        if chosen is None:
            raise RegistryUnauthorized(f"unauthorized: {self.host} asks for authentication we do not know "
                                       f"({', '.join(resp.headers.getlist('WWW-Authenticate')) or 'no challenge'})")
        self._challenge = chosen
        opts = self.options
        if chosen.scheme == "basic":
            if opts.username is None:
                raise RegistryUnauthorized(f"unauthorized: registry {self.host} requires credentials and none were "
                                           "given (IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY)")
            self._authorization = auth.basic_header(opts.username, opts.password or "")
        else:
            self._authorization = "Bearer " + self._fetch_token(chosen)

    def _fetch_token(self, challenge: auth.Challenge) -> str:
        url = auth.token_url(challenge, auth.pull_scope(self.repository))
        headers = {}
        if self.options.username is not None:
            headers["Authorization"] = auth.basic_header(self.options.username, self.options.password or "")
        resp = self._send(url, headers)
        with contextlib.closing(resp):
            realm = challenge.params.get("realm", "")
            if resp.status in (401, 403):
                who = "the credentials" if self.options.username is not None else "anonymous access"
                raise RegistryUnauthorized(f"unauthorized: token server {realm} for {self.host} refused {who} "
                                           f"(HTTP {resp.status}){error_detail(resp)}; {CREDENTIALS_HINT}")
            if resp.status != 200:
                raise RegistryError(f"token server {realm} for {self.host} answered HTTP {resp.status}"
                                    f"{error_detail(resp)}")
            return auth.parse_token(read_capped(resp, auth.MAX_TOKEN_RESPONSE, f"token from {realm}"), realm)

    # -- requests -------------------------------------------------------------------------------------

    def get(self, path: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """GET base+path with auth, following redirects; the caller handles every status but 401 and 3xx."""
        self.ping()
        assert self.base is not None
        refreshed = False
        while True:
            resp = self._follow(self.base + path, headers)
            if resp.status not in (401, 403) or refreshed or self._challenge is None:
                break
            # A token for the wrong scope (or an expired one): one more token, then give up.
            with contextlib.closing(resp):
                self._answer(resp)
            refreshed = True
        if resp.status == 401 or (resp.status == 403 and self._authorization is not None):
            detail = error_detail(resp)
            resp.close()
            given = "were refused" if self.options.username is not None else "are required and none were given"
            raise RegistryUnauthorized(f"unauthorized: {self.host} answered HTTP {resp.status} for "
                                       f"{self.repository}{detail}: credentials {given}; {CREDENTIALS_HINT}")
        return resp

    def _follow(self, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        origin = _origin(url)
        chain = [url]
        for _ in range(self.options.max_redirects + 1):
            sent = dict(headers)
            # The registry's credentials stay with the registry: a blob store on another host gets none.
            if self._authorization is not None and _origin(url) == origin:
                sent["Authorization"] = self._authorization
            resp = self._send(url, sent)
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.close()
            url = next_hop(url, resp.status, location, chain)
            chain.append(url)
        raise RegistryError(f"GET {chain[0]}: more than {self.options.max_redirects} redirects")

    def _send(self, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        all_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        timeout = self.options.io_timeout
        try:
            return self.pools.for_url(url).request(
                "GET", url, headers=all_headers, preload_content=False, decode_content=False, redirect=False,
                retries=False, timeout=urllib3.Timeout(connect=timeout, read=timeout))
        except HTTPError as err:
            raise RegistryError(describe(err, url, timeout)) from err


def describe(err: BaseException, url: str, timeout: float) -> str:
    """One line for a network failure: which host, what happened, which timeout fired, what to set."""
    host = urlsplit(url).netloc
    if isinstance(err, SSLError):
        reason = _ssl_reason(err)
        if _speaks_plain_http(err):
            return f"TLS handshake with {host} failed ({reason}): it does not seem to speak TLS"
        return (f"TLS verification of {host} failed: {reason}; add its CA with IMPORTER_CERT_DIR "
                "(or set INSECURE_TLS to skip verification)")
    if isinstance(err, ProxyError):
        return f"proxy failure reaching {host}: {err}"
    if isinstance(err, NewConnectionError):
        return f"cannot connect to {host}: {_innermost(err)}"
    if isinstance(err, ConnectTimeoutError):
        return f"connecting to {host} timed out after {timeout:g} s (connect timeout: half the stall timeout)"
    if isinstance(err, ReadTimeoutError):
        return (f"no data from {host} for {timeout:g} s (read timeout: half the stall timeout, "
                "--stall-timeout/IMPORTER_STALL_TIMEOUT)")
    if isinstance(err, ProtocolError):
        return f"connection to {host} broke: {_innermost(err)}"
    return f"request to {host} failed: {err}"


def _ssl_reason(err: BaseException) -> str:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message)
        nested = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        seen = nested or seen.__cause__ or seen.__context__
    return _innermost(err)


def _speaks_plain_http(err: BaseException) -> bool:
    text = str(err).lower()
    return any(sign in text for sign in _PLAIN_HTTP_SIGNS)


def _innermost(err: BaseException) -> str:
    """The deepest message (urllib3 wraps OSError in two layers of its own text)."""
    inner: BaseException = err
    while True:
        nested = inner.args[-1] if inner.args and isinstance(inner.args[-1], BaseException) else None
        nested = nested or inner.__cause__
        if nested is None:
            break
        inner = nested
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror.lower()
    return str(inner) or type(inner).__name__


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def read_capped(resp: urllib3.BaseHTTPResponse, cap: int, what: str) -> bytes:
    """A whole small body (manifest, token), refused past cap bytes whatever Content-Length says."""
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > cap:
        raise RegistryError(f"{what} is {length} bytes, more than the limit of {cap}")
    try:
        body = resp.read(cap + 1)
    except HTTPError as err:
        raise RegistryError(f"reading {what}: {_innermost(err)}") from err
    if len(body) > cap:
        raise RegistryError(f"{what} is more than the limit of {cap} bytes")
    return body


def error_detail(resp: urllib3.BaseHTTPResponse) -> str:
    """`: CODE message` from distribution's error JSON, when the body has it."""
    with contextlib.suppress(Exception):
        doc = json.loads(resp.read(MAX_ERROR_BODY))
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            return f" ({first.get('code', '')}: {first.get('message', '')})".replace("(: ", "(")
    return ""
