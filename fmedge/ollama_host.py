"""OLLAMA_HOST parsed exactly as Ollama's own client does (envconfig.Host).

Kept apart from the adapter so configuration can resolve the URL without importing
urllib3. Rules (from Ollama's tests): quotes and spaces stripped; no scheme means http
and port 11434; an explicit scheme means port 80/443; a path prefix is kept; an invalid
port falls back to 11434; ``ollama.com`` means https; 0.0.0.0 and :: connect locally.
"""

DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
_DEFAULT_PORT = 11434


def parse_ollama_host(value):
    """Return the base URL (no trailing slash) that ``OLLAMA_HOST=value`` means."""
    raw = (value or "").strip().strip("\"'").strip()
    if not raw:
        return DEFAULT_OLLAMA_URL
    scheme, rest, port = "http", raw, _DEFAULT_PORT
    if "://" in raw:
        scheme, rest = raw.split("://", 1)
        scheme = scheme.lower() or "http"
        port = 443 if scheme == "https" else 80
    elif raw.split(":")[0] == "ollama.com":
        scheme, port = "https", 443
    hostport, slash, path = rest.partition("/")
    host, parsed_port = _split_host_port(hostport)
    if parsed_port is not None:
        port = parsed_port
    host = _connectable(host)
    prefix = ("/" + path).rstrip("/") if slash else ""
    return f"{scheme}://{host}:{port}{prefix}"


def _split_host_port(hostport):
    """Split ``host:port`` (IPv6 with or without brackets); an invalid port is None."""
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        return host, _valid_port(tail[1:]) if tail.startswith(":") else None
    if hostport.count(":") > 1:  # bare IPv6 like ::1 has no port
        return hostport, None
    host, sep, port = hostport.partition(":")
    return host, _valid_port(port) if sep else None


def _valid_port(text):
    try:
        port = int(text)
    except ValueError:
        return None
    return port if 0 <= port <= 65535 else None


def _connectable(host):
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
