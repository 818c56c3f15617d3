"""Guards of the local HTTP API: bind address, bearer token, Host/Origin, request limits.

Python's documentation warns that ``http.server`` "only implements basic security
checks"; these are the rest (reliability.md §3):

* a non-loopback bind is refused unless ``api_token`` is set;
* the token is compared as bytes with ``hmac.compare_digest`` (no early exit on length);
* on a loopback bind the ``Host`` header must be exactly a loopback name (DNS rebinding:
  a page served from ``evil.example`` that re-resolves to 127.0.0.1 still says
  ``Host: evil.example``), and a present ``Origin`` must be one too; fm-edge never sends
  CORS headers, so a browser cannot read or preflight its way in;
* every request is bounded in head size, body size and time (``ServerLimits``).

Each check raises :class:`HttpError`, so every refusal has the API's one error shape.
"""

import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigError, FmEdgeError

# Exact names a loopback-bound API answers to (with any port). Prefix matching would
# also accept "localhost.evil.com" (open-mem PR #10), so only exact names are compared.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

# Query parameters that look like credentials: refused, because URLs end up in logs,
# shell history and proxies (reliability.md §3.2).
CREDENTIAL_QUERY_NAMES = frozenset({"token", "access_token", "api_token", "api_key",
                                    "apikey", "key", "auth"})

MAX_IDEMPOTENCY_KEY_LENGTH = 255


@dataclass(frozen=True)
class ServerLimits:
    """Bounds that keep one client (or many) from exhausting the device."""

    # Largest request body (the run's inputs); bigger bodies get 413 before any is read.
    max_body_bytes: int = 1024 * 1024
    # Request line plus headers; a client that sends more gets 431.
    max_head_bytes: int = 32 * 1024
    # A connection that sends nothing (new, or idle between keep-alive requests) is
    # closed after this long; it costs a file descriptor meanwhile, never a thread.
    idle_timeout_s: float = 10.0
    # From a request's first byte to the end of its head (slow-loris senders).
    head_timeout_s: float = 10.0
    # Reading the body, and writing the response (a reader that never reads).
    io_timeout_s: float = 10.0
    # Threads that handle requests. Requests whose head arrived wait for one in a queue.
    max_workers: int = 16
    # Workers that ``?wait=true`` requests may never take, so quick requests (/health,
    # /status) always find one; a waiting request past that gets 202 instead.
    quick_workers: int = 4
    # Open connections of every kind; the next one gets 503 and is closed at once.
    max_connections: int = 512
    # A request that waited this long for a worker gets 503 + Retry-After.
    queue_timeout_s: float = 10.0

    def __post_init__(self):
        if self.max_workers < 1 or not 0 <= self.quick_workers < self.max_workers:
            raise ConfigError(f"server limits: max_workers ({self.max_workers}) must be "
                              f">= 1 and quick_workers ({self.quick_workers}) between 0 and "
                              "max_workers - 1")

    @property
    def max_waiting_workers(self):
        return self.max_workers - self.quick_workers


class HttpError(FmEdgeError):
    """A refusal at the HTTP level (bad Host, no token, body too large, ...)."""

    exit_code = 2

    def __init__(self, http_status, code, message, headers=None, close=False):
        super().__init__(message, code=code)
        self.http_status = http_status
        self.headers = dict(headers or {})
        # True when the connection cannot be reused (e.g. an unread body is pending).
        self.close = close


# -- bind address ------------------------------------------------------------------------

def is_loopback_host(host):
    """True for localhost and addresses in 127.0.0.0/8 or ::1; False for ''/0.0.0.0/names."""
    if not host:
        return False
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host, api_token):
    """Refuse to serve a non-loopback address without a token (reliability.md §3.1)."""
    if is_loopback_host(host) or api_token:
        return
    shown = host or "all interfaces"
    raise ConfigError(
        f"refusing to serve the HTTP API on {shown!r} without an api_token: anyone who can "
        "reach that address could run pipelines. Set api_token (e.g. `fm-edge config set "
        "api_token \"$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\"`) "
        "or bind 127.0.0.1")


# -- bearer token --------------------------------------------------------------------------

def check_token(authorization, expected):
    """Raise 401 unless ``authorization`` is ``Bearer <expected>``; no-op without a token."""
    if not expected:
        return
    scheme, _, presented = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise _unauthorized("this endpoint needs the header `Authorization: Bearer "
                            "<api_token>` (the api_token from fm-edge's config)")
    if not token_matches(presented.strip(), expected):
        raise _unauthorized("the bearer token does not match this device's api_token: "
                            "check the token the client sends (`fm-edge config get "
                            "api_token` shows it masked)")


def token_matches(presented, expected):
    """Constant-time comparison of bytes, whatever their lengths.

    Header values arrive decoded as latin-1, so encoding back to latin-1 gives the bytes
    the client sent; ``compare_digest`` on str would raise TypeError for non-ASCII.
    """
    try:
        given = presented.encode("latin-1")
    except UnicodeEncodeError:
        given = presented.encode("utf-8")
    return hmac.compare_digest(given, expected.encode("utf-8"))


def _unauthorized(message):
    return HttpError(401, "unauthorized", message,
                     headers={"WWW-Authenticate": 'Bearer realm="fm-edge"'})


def check_query_credentials(params):
    """A token in the query string is refused: it would be written to access logs."""
    leaked = sorted(name for name in params if name.lower() in CREDENTIAL_QUERY_NAMES)
    if leaked:
        raise HttpError(400, "credentials_in_query",
                        f"query parameter {leaked[0]!r} looks like a credential and is not "
                        "accepted in URLs (they end up in logs): send `Authorization: "
                        "Bearer <api_token>` instead")


# -- Host and Origin (DNS rebinding, CSRF) -------------------------------------------------
# Their refusals close the connection: a page that is not ours gets no keep-alive either.

def parse_host(value):
    """The lower-cased host name of a Host header ('[::1]:8080' -> '::1'), or None."""
    text = (value or "").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if rest and not _is_port_suffix(rest):
            return None
    elif text.count(":") > 1:
        return None            # an IPv6 address must be bracketed in a Host header
    else:
        host, _, port = text.partition(":")
        if ":" in text and not _is_port_suffix(":" + port):
            return None
    return host or None


def _is_port_suffix(text):
    return text.startswith(":") and (text[1:].isdigit() or text == ":") and len(text) <= 6


def check_host(value, loopback_bind, allowed=LOOPBACK_NAMES):
    """400 for a missing or malformed Host; 421 on a loopback bind for any other name."""
    if value is None or not value.strip():
        raise HttpError(400, "missing_host", "the request has no Host header (HTTP/1.1 "
                        "requires one): send `Host: 127.0.0.1:<port>`", close=True)
    host = parse_host(value)
    if host is None:
        raise HttpError(400, "bad_host", f"Host header {_shown(value)} is not a host name "
                        "with an optional port", close=True)
    if loopback_bind and host not in allowed:
        raise HttpError(421, "host_not_allowed",
                        f"Host {_shown(value)} is not a name of this server: on a loopback "
                        "bind the API answers only to localhost, 127.0.0.1 and [::1] "
                        "(protection against DNS rebinding); use one of those in the URL",
                        close=True)
    return host


def check_origin(origin, request_host, loopback_bind, allowed=LOOPBACK_NAMES):
    """403 for a cross-origin browser request; requests without Origin pass.

    On a loopback bind the origin must be a loopback name; on other binds it must be the
    same host the request was sent to. fm-edge never answers CORS preflights.
    """
    if origin is None:
        return
    host = _origin_host(origin)
    permitted = host in allowed if loopback_bind else host == request_host
    if host is None or not permitted:
        raise HttpError(403, "origin_not_allowed",
                        f"cross-origin request from Origin {_shown(origin)} refused: the "
                        "fm-edge API does not serve web pages of other origins (no CORS); "
                        "call it from a script or the same origin", close=True)


def _origin_host(origin):
    text = origin.strip()
    if text == "null":
        return None
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    return host.lower()


# -- other request headers -----------------------------------------------------------------

def check_idempotency_key(value):
    """The key as given, if it is 1..255 printable ASCII characters; else 400."""
    if value is None:
        return None
    key = value.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH or not all(
            " " < ch <= "~" for ch in key):
        raise HttpError(400, "bad_idempotency_key",
                        f"Idempotency-Key {_shown(value)} is not usable: use 1 to "
                        f"{MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters without "
                        "spaces (a UUID is a good key)")
    return key


def _shown(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "...'"
