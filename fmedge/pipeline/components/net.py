"""Components that reach outside the run: HTTP calls, webhooks and local files (§4.3, §4.6).

All of them are ``blocking``: the executor runs them in a worker thread. HTTP goes through
the run's shared urllib3 PoolManager (``ctx.http()``), whose TLS verification is never
switched off. Network failures a later attempt may not meet (connection refused, timeouts,
5xx answers) raise ``ComponentError(retryable=True)`` so the stage's ``retry_config`` can
retry them; everything else is an input problem (MappingError) or part of the output.

``local_file`` can only reach the directories ``allowed_roots(ctx)`` returns: a pipeline
pulled from the cloud must not read or overwrite arbitrary files on the device.
"""

import base64
import codecs
import csv
import io
import json
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import urllib3
from urllib3.exceptions import (HTTPError, LocationValueError, MaxRetryError,
                                NewConnectionError, SSLError)
from urllib3.exceptions import TimeoutError as UrllibTimeout

from . import component
from .base import ComponentError, Field, MappingError

# Larger answers/files are refused rather than held in a small device's memory.
MAX_RESPONSE_BYTES = 10 * 1024 * 1024
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_LISTED_FILES = 10000
MAX_REDIRECTS = 10
# http_request `timeout` is seconds (reference: 1..300); the gallery writes milliseconds
# (30000), so a value above this many seconds is read as milliseconds.
TIMEOUT_SECONDS_MAX = 300
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
_CHARSET = re.compile(r"charset=([\w.:-]+)", re.I)


# -- HTTP plumbing shared by http_request and the routers -----------------------------------

class _Answer:
    """One HTTP response, fully read: status, lower-cased headers, raw body, final URL."""

    def __init__(self, status, headers, data, url):
        self.status, self.headers, self.data, self.url = status, headers, data, url

    def text(self):
        match = _CHARSET.search(self.headers.get("content-type", ""))
        encoding = match.group(1) if match else "utf-8"
        try:
            return self.data.decode(encoding, "replace")
        except LookupError:
            return self.data.decode("utf-8", "replace")


def _send(pool, method, url, body, headers, timeout_s, follow_redirects):
    """Send one request with no retries of its own; raise ComponentError on transport errors."""
    retries = urllib3.Retry(total=None, connect=0, read=0, other=0, status=0,
                            redirect=MAX_REDIRECTS if follow_redirects else 0,
                            raise_on_redirect=False, raise_on_status=False)
    try:
        response = pool.request(method, url, body=body, headers=headers,
                                timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                                retries=retries, redirect=follow_redirects,
                                preload_content=False)
    except (HTTPError, OSError) as error:
        raise _transport_error(method, url, error, timeout_s) from error
    try:
        data = response.read(MAX_RESPONSE_BYTES + 1)
        final_url = _final_url(response, url)
        headers = {name.lower(): response.headers[name] for name in response.headers}
    except (HTTPError, OSError) as error:
        raise _transport_error(method, url, error, timeout_s) from error
    finally:
        response.release_conn()
    if len(data) > MAX_RESPONSE_BYTES:
        raise ComponentError("{} {} answered more than {} MB; fm-edge refuses larger "
                             "responses (ask the service for less, e.g. with paging "
                             "parameters)".format(method, _shown(url),
                                                  MAX_RESPONSE_BYTES // (1024 * 1024)))
    return _Answer(response.status, headers, data, final_url)


def _final_url(response, url):
    """The URL of the last request made: urllib3 keeps redirects in the retry history."""
    history = getattr(getattr(response, "retries", None), "history", None) or ()
    for entry in reversed(history):
        if entry.redirect_location:
            return urljoin(entry.url or url, entry.redirect_location)
    return url


def _transport_error(method, url, error, timeout_s):
    reason = error.reason if isinstance(error, MaxRetryError) and error.reason else error
    target = "{} {}".format(method, _shown(url))
    if isinstance(reason, SSLError):
        return ComponentError("{}: TLS verification failed ({}); fm-edge always verifies "
                              "certificates: use a certificate the device trusts, or add the "
                              "server's CA to ca_bundle".format(target, reason))
    if isinstance(reason, (LocationValueError, ValueError)):
        return MappingError("{}: not a usable URL ({}); write it as http(s)://host/path"
                            .format(target, reason))
    # NewConnectionError (refused, DNS) subclasses urllib3's TimeoutError: test it first.
    if isinstance(reason, UrllibTimeout) and not isinstance(reason, NewConnectionError):
        return ComponentError("{}: no answer within {:g} s ({}); raise 'timeout' or check the "
                              "service".format(target, timeout_s, reason), retryable=True)
    return ComponentError("{}: could not reach the service ({}); check the URL and that it "
                          "is up".format(target, reason), retryable=True)


def _shown(url):
    """The URL without query and fragment, for messages (queries may hold tokens)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _string_map(owner, field, mapping, allow_lists=False):
    """Header/param values as strings: numbers and booleans are rendered, null refused."""
    result = {}
    for key, value in (mapping or {}).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        elif allow_lists and isinstance(value, list):
            value = [str(item) for item in value]
        if not isinstance(value, (str, list)):
            raise MappingError("{}: {}[{!r}] is {!r}; values must be strings (a template "
                               "that resolved to null usually means a missing input or env "
                               "variable)".format(owner, field, key, value))
        result[str(key)] = value
    return result


def _with_params(url, params):
    if not params:
        return url
    parts = urlsplit(url)
    query = "&".join(part for part in (parts.query, urlencode(params, doseq=True)) if part)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _parsed_body(answer):
    """JSON when the body parses as JSON (whatever the content type), else text."""
    text = answer.text()
    if text.strip():
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def _utc_now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- http_request ------------------------------------------------------------------------

@component("http_request", blocking=True, fields={
    "url": Field("str", required=True),
    "method": Field("str", default="GET"),
    "headers": Field("dict?"),
    "body": Field("any?"),
    "json": Field("any?"),
    "params": Field("dict?"),
    "query_params": Field("dict?"),
    "timeout": Field("float", default=30.0),
    "follow_redirects": Field("bool", default=True),
    "verify_ssl": Field("bool", default=True),
    "fail_on_server_error": Field("bool", default=True),
})
def http_request(ctx):
    """Call an HTTP API. Output ``{status_code, headers, body, elapsed_ms, success, url}``.

    ``body`` (or its alias ``json``): an object or array is sent as JSON (an empty one is
    not sent, as in the reference), a string as is. ``params`` (alias ``query_params``, as
    the gallery writes it) are added to the query string. ``timeout`` is in seconds; above
    300 it is read as milliseconds (the gallery's ``30000``); it never exceeds the stage's
    own time limit. ``headers`` in the output have lower-case names; ``body`` is parsed JSON
    when it parses, else text; ``url`` is the final URL after redirects.
    1xx-4xx answers are output (``success`` is true for 2xx). Differences from the
    reference: a 5xx answer raises a retryable ComponentError (``fail_on_server_error:
    false`` returns it as output instead), and ``verify_ssl: false`` is refused.
    """
    inputs = ctx.inputs
    method = str(inputs.get("method") or "GET").strip().upper()
    if method not in _METHODS:
        raise MappingError("http_request: method {!r} is not one of {}".format(
            inputs.get("method"), ", ".join(_METHODS)))
    url = _request_url(inputs)
    headers = _string_map("http_request", "headers", inputs.get("headers"))
    payload, headers = _request_body(inputs, headers)
    timeout_s = _timeout_seconds(ctx, inputs.get("timeout"))
    started = time.monotonic()
    answer = _send(ctx.http(), method, url, payload, headers, timeout_s,
                   inputs.get("follow_redirects", True))
    elapsed_ms = int((time.monotonic() - started) * 1000)
    if answer.status >= 500 and inputs.get("fail_on_server_error", True):
        raise ComponentError(
            "{} {} answered {}: {}; the stage's retry_config retries it, or set "
            "fail_on_server_error: false to receive 5xx answers as output".format(
                method, _shown(url), answer.status, answer.text()[:200].strip() or
                "(empty body)"), retryable=True)
    ctx.log("info", "{} {} -> {}".format(method, _shown(url), answer.status),
            elapsed_ms=elapsed_ms)
    return {"status_code": answer.status, "headers": answer.headers,
            "body": "" if method == "HEAD" else _parsed_body(answer),
            "elapsed_ms": elapsed_ms, "success": 200 <= answer.status < 300,
            "url": answer.url}


def _request_url(inputs):
    if inputs.get("verify_ssl") is False:
        raise MappingError("http_request: verify_ssl: false is refused; fm-edge always "
                           "verifies TLS certificates. Remove it, and add the server's CA "
                           "certificate to the configuration's ca_bundle if it is private")
    url = str(inputs.get("url") or "").strip()
    if not re.match(r"^https?://[^/\s]", url, re.I):
        raise MappingError("http_request: url {!r} is not an http:// or https:// URL; write "
                           "e.g. \"https://api.example.com/items\"".format(url))
    params, alias = inputs.get("params"), inputs.get("query_params")
    if params and alias and params != alias:
        raise MappingError("http_request: both 'params' and 'query_params' are given and "
                           "differ; keep one ('query_params' is an alias of 'params')")
    return _with_params(url, _string_map("http_request", "params", params or alias,
                                        allow_lists=True))


def _request_body(inputs, headers):
    body, alias = inputs.get("body"), inputs.get("json")
    if body is not None and alias is not None and body != alias:
        raise MappingError("http_request: both 'body' and 'json' are given and differ; keep "
                           "one ('json' is an alias of 'body')")
    body = body if body is not None else alias
    if isinstance(body, (dict, list)) and body:
        if not any(name.lower() == "content-type" for name in headers):
            headers = dict(headers, **{"Content-Type": "application/json"})
        return json.dumps(body, ensure_ascii=False).encode("utf-8"), headers
    if isinstance(body, str) and body:
        return body.encode("utf-8"), headers
    if body not in (None, "", {}, []):
        raise MappingError("http_request: body is {!r}; send an object, an array or a "
                           "string".format(body))
    return None, headers


def _timeout_seconds(ctx, value):
    if value is None or value <= 0:
        raise MappingError("http_request: timeout {!r} must be a positive number of seconds "
                           "(e.g. 30)".format(value))
    seconds = value / 1000.0 if value > TIMEOUT_SECONDS_MAX else float(value)
    stage_limit = getattr(ctx.stage, "effective_timeout_ms", None)
    # The request must not outlive its stage: the worker thread cannot be interrupted.
    return min(seconds, stage_limit / 1000.0) if stage_limit else seconds


# -- output_router / error_router (webhooks) ------------------------------------------------

_DESTINATION_TYPES = ("webhook", "email", "database", "message_queue")


@component("output_router", blocking=True, fields={
    "data": Field("any", required=True),
    "destinations": Field("list", required=True),
    "is_error": Field("bool", default=False),
    "error_message": Field("str?"),
    "metadata": Field("dict?"),
    "parallel": Field("bool", default=True),
    "fail_on_error": Field("bool", default=False),
})
def output_router(ctx):
    """Deliver ``{data, is_error, error_message, metadata, timestamp}`` to destinations.

    Output ``{total_destinations, successful_deliveries, failed_deliveries,
    skipped_deliveries, results, all_succeeded}``; each result is ``{destination_id,
    destination_name, destination_type, success, status_code, response, error,
    duration_ms}``. A destination is ``{id, type, name, enabled, config, on_success,
    on_error}``. Webhooks POST (or PUT, ``config.method``) JSON to ``config.url`` with
    ``config.headers``, ``config.timeout_ms`` (30000) and ``config.retry_count`` attempts
    (3) on connection errors, waiting ``config.retry_backoff_ms`` (1000) doubled each time.
    Differences from the reference: email, database and message_queue destinations, and
    Jinja2 ``payload_template``s, fail their delivery with a clear error (the reference
    pretended to deliver); ``fail_on_error`` raises a non-retryable error, because retrying
    the stage would deliver again to the destinations that succeeded.
    """
    inputs = ctx.inputs
    payload = {"data": inputs.get("data"), "is_error": bool(inputs.get("is_error")),
               "error_message": inputs.get("error_message"),
               "metadata": inputs.get("metadata") or {}, "timestamp": _utc_now()}
    return route(ctx, inputs.get("destinations"), payload, bool(inputs.get("is_error")),
                 inputs.get("parallel", True), inputs.get("fail_on_error", False))


def route(ctx, destinations, payload, is_error, parallel, fail_on_error,
          on_error_default=False):
    """Deliver ``payload`` to every active destination; the output_router output."""
    parsed = [_destination(item, index, on_error_default)
              for index, item in enumerate(destinations or [])]
    active = [d for d in parsed if d["enabled"] and (d["on_error"] if is_error
                                                     else d["on_success"])]
    pool = ctx.http()
    if parallel and len(active) > 1:
        with ThreadPoolExecutor(max_workers=min(8, len(active))) as workers:
            results = list(workers.map(lambda d: _deliver(ctx, pool, d, payload), active))
    else:
        results = [_deliver(ctx, pool, d, payload) for d in active]
    failed = [r for r in results if not r["success"]]
    if fail_on_error and failed:
        raise ComponentError("delivery failed for {}: {}".format(
            ", ".join(r["destination_name"] for r in failed),
            "; ".join(str(r["error"] or r["status_code"]) for r in failed)))
    return {"total_destinations": len(parsed),
            "successful_deliveries": len(results) - len(failed),
            "failed_deliveries": len(failed), "skipped_deliveries": len(parsed) - len(active),
            "results": results, "all_succeeded": not failed}


def _destination(item, index, on_error_default):
    if not isinstance(item, dict):
        raise MappingError("destinations[{}] is {!r}; write {{\"id\": \"crm\", \"type\": "
                           "\"webhook\", \"name\": \"CRM\", \"config\": {{\"url\": "
                           "\"https://...\"}}}}".format(index, item))
    kind = item.get("type")
    if kind not in _DESTINATION_TYPES:
        raise MappingError("destinations[{}].type {!r} is not one of {}".format(
            index, kind, ", ".join(_DESTINATION_TYPES)))
    config = item.get("config") or {}
    if not isinstance(config, dict):
        raise MappingError("destinations[{}].config must be an object".format(index))
    ident = str(item.get("id") or "destination-{}".format(index))
    return {"id": ident, "name": str(item.get("name") or ident), "type": kind,
            "config": config, "enabled": item.get("enabled", True) is not False,
            "on_success": item.get("on_success", True) is not False,
            "on_error": bool(item.get("on_error", on_error_default)),
            "payload_template": item.get("payload_template")}


def _deliver(ctx, pool, destination, payload):
    started = time.monotonic()
    result = {"destination_id": destination["id"], "destination_name": destination["name"],
              "destination_type": destination["type"], "success": False,
              "status_code": None, "response": None, "error": None}
    try:
        result.update(_deliver_webhook(ctx, pool, destination, payload))
    except (ComponentError, MappingError) as error:
        result["error"] = str(error)
    result["duration_ms"] = int((time.monotonic() - started) * 1000)
    return result


def _deliver_webhook(ctx, pool, destination, payload):
    if destination["type"] != "webhook":
        raise ComponentError("{} delivery is not available on fm-edge (the reference only "
                             "pretends to send it); use a webhook destination".format(
                                 destination["type"]))
    if destination["payload_template"]:
        raise ComponentError("payload_template (Jinja2) is not supported on fm-edge; remove "
                             "it to send the standard payload, or shape the data with "
                             "json_transform before this stage")
    config = destination["config"]
    method, url = str(config.get("method", "POST")).upper(), config.get("url")
    if method not in ("POST", "PUT") or not isinstance(url, str) or not url:
        raise MappingError("a webhook needs config.url (a string) and config.method POST or "
                           "PUT, got url={!r} method={!r}".format(url, method))
    headers = dict(_string_map("webhook", "config.headers", config.get("headers")),
                   **{"Content-Type": "application/json"})
    body = json.dumps(payload, default=str).encode("utf-8")
    answer = _with_retries(ctx, config, lambda timeout_s: _send(
        pool, method, url, body, headers, timeout_s, True))
    return {"success": 200 <= answer.status < 300, "status_code": answer.status,
            "response": answer.text()[:500] or None}


def _config_number(config, key, default, low):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise MappingError("webhook config.{} must be a number >= {}, got {!r}".format(
            key, low, value))
    return value


def _with_retries(ctx, config, attempt):
    timeout_s = _config_number(config, "timeout_ms", 30000, 1) / 1000.0
    attempts = int(_config_number(config, "retry_count", 3, 1))
    delay_s = _config_number(config, "retry_backoff_ms", 1000, 0) / 1000.0
    for number in range(attempts):
        try:
            return attempt(timeout_s)
        except ComponentError as error:
            if not error.retryable or number == attempts - 1 or ctx.cancelled:
                raise
        time.sleep(delay_s * 2 ** number)


@component("error_router", blocking=True, fields={
    "error_type": Field("str", required=True),
    "error_message": Field("str", required=True),
    "stage_id": Field("str?"),
    "pipeline_id": Field("str?"),
    "run_id": Field("str?"),
    "destinations": Field("list", required=True),
    "include_stack_trace": Field("bool", default=False),
    "severity": Field("str", default="error"),
})
def error_router(ctx):
    """Send an error notification through output_router's delivery.

    Payload data ``{error_type, error_message, stage_id, pipeline_id, run_id, severity,
    timestamp}`` (pipeline_id and run_id default to this run's). Output
    ``{notifications_sent, failed_notifications, results}``. Difference from the reference:
    destinations are notified unless they say ``on_error: false`` (the reference skipped
    every destination that did not set ``on_error: true``, so by default it sent nothing).
    ``include_stack_trace`` is accepted and ignored, as in the reference.
    """
    inputs = ctx.inputs
    severity = str(inputs.get("severity") or "error").strip().lower()
    if severity not in ("critical", "error", "warning", "info"):
        raise MappingError("error_router: severity {!r} is not one of critical, error, "
                           "warning, info".format(inputs.get("severity")))
    data = {"error_type": inputs.get("error_type"),
            "error_message": inputs.get("error_message"), "stage_id": inputs.get("stage_id"),
            "pipeline_id": inputs.get("pipeline_id") or ctx.run.pipeline_id,
            "run_id": inputs.get("run_id") or ctx.run.run_id, "severity": severity,
            "timestamp": _utc_now()}
    payload = {"data": data, "is_error": True, "error_message": inputs.get("error_message"),
               "metadata": {"severity": severity}, "timestamp": data["timestamp"]}
    routed = route(ctx, inputs.get("destinations"), payload, True, True, False,
                   on_error_default=True)
    return {"notifications_sent": routed["successful_deliveries"],
            "failed_notifications": routed["failed_deliveries"], "results": routed["results"]}


# -- local_file ----------------------------------------------------------------------------

def allowed_roots(ctx):
    """The directories local_file may use: config ``local_file_roots``, else
    ``<data_dir>/files``. Real paths (symlinks resolved), in order; the first one is where
    relative paths point."""
    config = getattr(ctx.run, "config", None)
    roots = getattr(config, "local_file_roots", None)
    if isinstance(roots, str):
        roots = [roots]
    if not roots:
        data_dir = getattr(config, "data_dir", None)
        if not data_dir:
            raise ComponentError("local_file: no data_dir is configured, so no directory is "
                                 "allowed; set data_dir or local_file_roots")
        roots = [os.path.join(data_dir, "files")]
    return [os.path.realpath(str(root)) for root in roots]


def _inside(path, root):
    return path == root or os.path.commonpath([root, path]) == root


def _allowed_path(ctx, path):
    """The real path for ``path`` if it lies under an allowed root (after following every
    symlink); ComponentError otherwise."""
    roots = allowed_roots(ctx)
    text = str(path or "")
    if not text or "\0" in text:
        raise MappingError("local_file: path {!r} is empty or not a valid path".format(path))
    real = os.path.realpath(text if os.path.isabs(text) else os.path.join(roots[0], text))
    if any(_inside(real, root) for root in roots):
        return real
    raise ComponentError(
        "local_file: path {!r} resolves to {}, outside the directories this device allows "
        "pipelines to use ({}); put the file there (relative paths start in {}), or add its "
        "directory to local_file_roots in the configuration".format(
            text, real, ", ".join(roots), roots[0]), code="path_not_allowed")


def _file_output(operation, **fields):
    output = {"success": True, "operation": operation, "content": None,
              "content_length": None, "rows": None, "row_count": None, "columns": None,
              "files": None, "file_count": None, "exists": None, "metadata": {},
              "error": None}
    output.update(fields)
    return output


class _FileProblem(Exception):
    """An operational failure (missing file, bad content): reported as success: false."""


_FILE_OPERATIONS = ("read", "write", "append", "delete", "list", "exists", "parse_csv",
                    "parse_excel")


@component("local_file", blocking=True, fields={
    "operation": Field("str", required=True),
    "path": Field("str", required=True),
    "format": Field("str?", default="text"),
    "content": Field("any?"),
    "encoding": Field("str?", default="utf-8"),
    "pattern": Field("str?", default="*"),
    "recursive": Field("bool?", default=False),
    "csv_options": Field("dict?"),
    "sheet_name": Field("any?", default=0),
})
def local_file(ctx):
    """Read, write, append, delete, list, test or parse files under ``allowed_roots``.

    Output (every key always present): ``{success, operation, content, content_length,
    rows, row_count, columns, files, file_count, exists, metadata, error}``; failures such
    as a missing file are ``success: false`` with ``error``, as in the reference. A path
    outside the allowed directories (also through a symlink) raises ComponentError.
    ``format``: text, json, csv (read as text; written from a list of objects) or binary
    (content is base64 text both ways, since outputs are JSON). Writes are atomic (a
    temporary file renamed over the target). ``parse_csv`` uses the csv module:
    ``csv_options`` {delimiter, header, skip_rows}; numbers become numbers and empty cells
    null, as pandas would read them. ``parse_excel`` is not available on this device.
    """
    inputs = ctx.inputs
    operation = str(inputs.get("operation") or "").strip().lower()
    if operation == "parse_excel":
        raise ComponentError("local_file: parse_excel is not available on this device (it "
                             "needs pandas and openpyxl); export the sheet as CSV and use "
                             "operation parse_csv")
    if operation not in _FILE_OPERATIONS:
        return _file_output(operation, success=False, error="Invalid operation {!r}. Must "
                            "be one of: {}".format(inputs.get("operation"),
                                                   ", ".join(_FILE_OPERATIONS)))
    real = _allowed_path(ctx, inputs.get("path"))
    started = time.monotonic()
    try:
        output = _FILE_HANDLERS[operation](inputs, real)
    except (_FileProblem, OSError, ValueError) as problem:
        output = _file_output(operation, success=False, error=_problem_text(problem, real))
    output["metadata"]["execution_time_ms"] = int((time.monotonic() - started) * 1000)
    return output


def _problem_text(problem, real):
    if isinstance(problem, FileNotFoundError):
        return "File not found: {}".format(real)
    if isinstance(problem, UnicodeDecodeError):
        return "{} is not valid text in this encoding ({}); set 'encoding' or use format " \
               "binary".format(real, problem.reason)
    if isinstance(problem, OSError):
        return "{}: {}".format(real, problem.strerror or problem)
    return str(problem)


def _encoding(inputs):
    name = inputs.get("encoding") or "utf-8"
    try:
        codecs.lookup(name)
    except LookupError:
        raise _FileProblem("unknown encoding {!r}; use e.g. utf-8 or latin-1".format(name)
                           ) from None
    return name


def _read_bytes(real):
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(real, flags)
    with os.fdopen(descriptor, "rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise _FileProblem("{} is larger than {} MB; fm-edge does not load larger files "
                           "into a run".format(real, MAX_FILE_BYTES // (1024 * 1024)))
    return data


def _read(inputs, real):
    fmt = (inputs.get("format") or "text").lower()
    data = _read_bytes(real)
    metadata = {"path": real, "format": fmt, "size_bytes": len(data)}
    if fmt == "binary":
        metadata["encoding"] = "base64"
        return _file_output("read", content=base64.b64encode(data).decode("ascii"),
                            content_length=len(data), metadata=metadata)
    text = data.decode(_encoding(inputs))
    if fmt == "json":
        try:
            return _file_output("read", content=json.loads(text), metadata=metadata)
        except ValueError as error:
            raise _FileProblem("{} is not valid JSON: {}".format(real, error)) from None
    return _file_output("read", content=text, content_length=len(text), metadata=metadata)


def _content_bytes(inputs, real):
    content, fmt = inputs.get("content"), (inputs.get("format") or "text").lower()
    if content is None:
        raise _FileProblem("content parameter is required for {} operation".format(
            inputs.get("operation")))
    if fmt == "binary":
        try:
            return base64.b64decode(str(content), validate=True)
        except ValueError:
            raise _FileProblem("format binary expects base64 text in 'content'") from None
    if fmt == "json":
        text = json.dumps(content, indent=2, ensure_ascii=False)
    elif fmt == "csv":
        text = _csv_text(content)
    else:
        text = content if isinstance(content, str) else json.dumps(content,
                                                                   ensure_ascii=False)
    return text.encode(_encoding(inputs))


def _csv_text(rows):
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise _FileProblem("For CSV format, content must be a list of objects")
    fields = {}
    for row in rows:
        for key in row:
            fields.setdefault(key, None)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    if rows:
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _write(inputs, real):
    data = _content_bytes(inputs, real)
    if os.path.isdir(real):
        raise _FileProblem("{} is a directory; give a file path".format(real))
    os.makedirs(os.path.dirname(real), exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(real), prefix=".fm-edge-")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, real)   # readers see the old file or the new one, never half
    except BaseException:
        os.unlink(temporary)
        raise
    return _file_output("write", content_length=len(data),
                        metadata={"path": real, "format": inputs.get("format") or "text"})


def _append(inputs, real):
    data = _content_bytes(dict(inputs, format="text"), real)
    os.makedirs(os.path.dirname(real), exist_ok=True)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(real, flags, 0o644), "ab") as handle:
        handle.write(data)
    return _file_output("append", content_length=len(data), metadata={"path": real})


def _delete(inputs, real):
    if os.path.isdir(real):
        raise _FileProblem("{} is a directory; local_file deletes files only".format(real))
    os.unlink(real)
    return _file_output("delete", metadata={"path": real})


def _exists(inputs, real):
    return _file_output("exists", exists=os.path.exists(real), metadata={"path": real})


def _list(inputs, real):
    if not os.path.isdir(real):
        raise _FileProblem("Directory not found: {}".format(real) if not os.path.exists(real)
                           else "Path is not a directory: {}".format(real))
    pattern = inputs.get("pattern") or "*"
    recursive = bool(inputs.get("recursive"))
    if os.path.isabs(pattern):
        raise _FileProblem("pattern {!r} must be relative to the directory, e.g. '*.csv'"
                           .format(pattern))
    try:
        found = Path(real).rglob(pattern) if recursive else Path(real).glob(pattern)
        files, truncated = _listed_files(found, real)
    except ValueError as error:
        raise _FileProblem("pattern {!r} is not usable: {}".format(pattern, error)) from None
    return _file_output("list", files=files, file_count=len(files),
                        metadata={"directory": real, "pattern": pattern,
                                  "recursive": recursive, "truncated": truncated})


def _listed_files(found, directory):
    files = []
    for candidate in found:
        if len(files) >= MAX_LISTED_FILES:
            return sorted(files, key=lambda f: f["path"]), True
        # A pattern with '..' or a symlink may lead out of the directory: skip those.
        if not _inside(os.path.realpath(str(candidate)), directory) or not candidate.is_file():
            continue
        stat = candidate.stat()
        files.append({"path": str(candidate), "name": candidate.name, "size": stat.st_size,
                      "modified": stat.st_mtime, "is_file": True})
    return sorted(files, key=lambda f: f["path"]), False


def _parse_csv(inputs, real):
    options = inputs.get("csv_options") or {}
    delimiter = options.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise _FileProblem("csv_options.delimiter must be one character, got {!r}".format(
            delimiter))
    text = _read_bytes(real).decode(_encoding(inputs))
    records = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    records = records[int(options.get("skip_rows", 0) or 0):]
    if options.get("header", True) is not False:
        columns, records = _header(records[0] if records else []), records[1:]
    else:
        columns = [str(i) for i in range(max((len(r) for r in records), default=0))]
    rows = [_csv_row(columns, record, number) for number, record in enumerate(records, 1)
            if record]
    return _file_output("parse_csv", rows=rows, row_count=len(rows), columns=columns,
                        metadata={"path": real, "delimiter": delimiter,
                                  "encoding": inputs.get("encoding") or "utf-8"})


def _header(cells):
    """Column names as pandas makes them: blanks become 'Unnamed: i', repeats get '.n'."""
    columns, seen = [], {}
    for index, cell in enumerate(cells):
        name = cell.strip() or "Unnamed: {}".format(index)
        if name in seen:
            seen[name] += 1
            name = "{}.{}".format(name, seen[name])
        else:
            seen[name] = 0
        columns.append(name)
    return columns


def _csv_row(columns, record, number):
    if len(record) > len(columns):
        raise _FileProblem("CSV row {} has {} fields but the header has {}".format(
            number, len(record), len(columns)))
    return {column: _csv_value(record[i]) if i < len(record) else None
            for i, column in enumerate(columns)}


_INTEGER = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


def _csv_value(cell):
    text = cell.strip()
    if not text:
        return None
    if _INTEGER.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return cell


_FILE_HANDLERS = {"read": _read, "write": _write, "append": _append, "delete": _delete,
                  "list": _list, "exists": _exists, "parse_csv": _parse_csv}
