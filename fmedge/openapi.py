"""The OpenAPI 3.0 description of the local HTTP API, as data (served at /openapi.json).

Kept beside the server and checked against it by a schemathesis run in the tests, so the
document and the behaviour cannot drift apart. Shapes owned by the runtime (a run's
result, a pipeline entry) are described by their stable fields and stay open to new ones.
"""

_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]*$"
_STATUSES = ["pending", "running", "completed", "failed", "cancelled", "timeout",
             "interrupted"]
_SYNC_STATES = ["local", "pending", "synced", "quarantined"]


def _ref(name, kind="schemas"):
    return {"$ref": f"#/components/{kind}/{name}"}


def _nullable(type_name, **extra):
    return dict({"type": type_name, "nullable": True}, **extra)


def _json(schema):
    return {"application/json": {"schema": schema}}


def _ok(description, schema):
    return {"description": description, "content": _json(schema)}


def _errors(*statuses):
    """References to the shared error responses, plus a default for anything else."""
    out = {str(status): _ref(f"E{status}", "responses") for status in statuses}
    out["default"] = _ref("Error", "responses")
    return out


_ERROR_TEXT = {
    400: "Bad request: malformed JSON, invalid id, bad query value, missing Host.",
    401: "Missing or wrong bearer token.",
    403: "Cross-origin request (Origin header not allowed).",
    404: "No such pipeline, run or endpoint.",
    405: "Method not allowed on this path (see the Allow header).",
    408: "The request did not arrive in time.",
    411: "A body without Content-Length (chunked bodies are refused).",
    413: "Request body over the limit (1 MiB by default).",
    415: "The body is not application/json.",
    421: "Host header is not a loopback name on a loopback bind (DNS rebinding).",
    422: "Idempotency-Key reused for a different request.",
    429: "Too many runs queued (max_queued_runs); retry after Retry-After seconds.",
    500: "Internal error (details in the device's log).",
    502: "The cloud refused the device's api_key, or another sync failure (see report).",
    503: "Unavailable: shutting down, overloaded, store unavailable, or sync not configured.",
    507: "The device's storage cannot take the run's record.",
}
_RETRY = {"Retry-After": {"description": "Seconds to wait before retrying.",
                          "schema": {"type": "integer", "minimum": 0}}}
_COMMON = (400, 401, 403, 421)


def _error_responses():
    out = {}
    for status, text in _ERROR_TEXT.items():
        response = {"description": text, "content": _json(_ref("Error"))}
        if status in (429, 503):
            response["headers"] = dict(_RETRY)
        if status == 401:
            response["headers"] = {"WWW-Authenticate": {
                "description": "Bearer realm=\"fm-edge\"", "schema": {"type": "string"}}}
        if status == 405:
            response["headers"] = {"Allow": {"description": "The allowed method.",
                                             "schema": {"type": "string"}}}
        out[f"E{status}"] = response
    out["Error"] = {"description": "An error, always in the same shape.",
                    "content": _json(_ref("Error"))}
    return out


def _schemas():
    return {
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "Stable machine name."},
                    "message": {"type": "string",
                                "description": "What happened, to what, what to do."},
                    "retryable": {"type": "boolean"}}},
                "report": {"type": "object", "additionalProperties": True,
                           "description": "POST /sync only: the failed pass's report."}}},
        "Inputs": {"type": "object", "additionalProperties": True,
                   "description": "The run's inputs, checked against the pipeline's "
                                  "input_schema."},
        "RunAccepted": {
            "type": "object", "required": ["run_id", "status"],
            "properties": {
                "run_id": {"type": "string"},
                "status": {"type": "string", "enum": ["queued"] + _STATUSES,
                           "description": "'queued' waits for a slot; its record appears "
                                          "when it starts."}}},
        "RunResult": {
            "type": "object", "additionalProperties": True,
            "required": ["run_id", "pipeline_id", "status"],
            "properties": {
                "run_id": {"type": "string"},
                "pipeline_id": {"type": "string"},
                "pipeline_version": _nullable("string"),
                "status": {"type": "string", "enum": ["queued"] + _STATUSES},
                "output": {"nullable": True, "description": "The output stage's output."},
                "error": _nullable("string"),
                "error_type": _nullable("string"),
                "failed_stage": _nullable("string"),
                "output_stage_id": _nullable("string"),
                "inputs": {"nullable": True},
                "started_at": _nullable("string"),
                "completed_at": _nullable("string"),
                "duration_ms": {"type": "number"},
                "device_id": _nullable("string"),
                "stages": {"type": "object", "additionalProperties": True},
                "usage": {"type": "object", "additionalProperties": True},
                "sync_state": {"type": "string", "enum": _SYNC_STATES},
                "sync_error": _nullable("string")}},
        "RunSummary": {
            "type": "object", "required": ["run_id", "pipeline_id", "status", "sync_state"],
            "properties": {
                "run_id": {"type": "string"},
                "pipeline_id": {"type": "string"},
                "pipeline_version": _nullable("string"),
                "status": {"type": "string", "enum": _STATUSES},
                "sync_state": {"type": "string", "enum": _SYNC_STATES},
                "created_at": {"type": "number"},
                "updated_at": {"type": "number"},
                "sync_error": _nullable("string")}},
        "RunList": {
            "type": "object", "required": ["runs", "count"],
            "properties": {"runs": {"type": "array", "items": _ref("RunSummary")},
                           "count": {"type": "integer", "minimum": 0}}},
        "Pipeline": {
            "type": "object", "additionalProperties": True,
            "required": ["id", "version", "sha256", "source"],
            "properties": {
                "id": {"type": "string"},
                "version": {"type": "string"},
                "sha256": {"type": "string"},
                "source": {"type": "string", "enum": ["local", "cloud", "bundle"]},
                "size": {"type": "integer"},
                "added_at": {"type": "number"},
                "last_used_at": {"type": "number"},
                "previous_version": _nullable("string")}},
        "PipelineList": {
            "type": "object", "required": ["pipelines", "count"],
            "properties": {"pipelines": {"type": "array", "items": _ref("Pipeline")},
                           "count": {"type": "integer", "minimum": 0}}},
        "Health": {
            "type": "object", "required": ["status", "ready"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "unavailable"]},
                "ready": {"type": "boolean"},
                "checks": {
                    "type": "object", "additionalProperties": True,
                    "description": "Only with a valid token (or when none is configured): "
                                   "store, llm (configured backend and last known state), "
                                   "sync (online / offline_since), runs, uptime_s."}}},
        "SyncReport": {"type": "object", "additionalProperties": True,
                       "description": "The sync pass's report (fmedge.sync)."},
    }


def _id_param(name, description):
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "pattern": _ID_PATTERN, "maxLength": 128}}


def _query(name, schema, description):
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _run_operation():
    return {
        "summary": "Run a pipeline",
        "description": "Starts a run of a cached (or bundled example) pipeline. Without "
                       "wait the answer is 202 once the run is admitted (recorded, or "
                       "queued behind max_concurrent runs); with ?wait=true or "
                       "`Prefer: wait[=seconds]` it is 200 with the finished result (202 "
                       "if the wait ends first). A failed run is still 200: see status.",
        "operationId": "runPipeline",
        "parameters": [
            _id_param("pipeline_id", "The pipeline's id."),
            _query("wait", {"type": "string", "enum": ["true", "false", "1", "0", "yes",
                                                      "no"]},
                   "Wait for the run to finish."),
            {"name": "Prefer", "in": "header", "required": False,
             "schema": {"type": "string"},
             "description": "RFC 7240: `wait` or `wait=SECONDS` waits for the result."},
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                        "pattern": "^[!-~]+$"},
             "description": "A repeated key returns the same run (kept in memory by the "
                            "serving process, last 10,000 keys)."},
        ],
        "requestBody": {"required": False, "content": _json(_ref("Inputs"))},
        "responses": dict({
            "200": _ok("The finished run (any status; a replayed key's stored run).",
                       _ref("RunResult")),
            "202": {"description": "Admitted; poll the Location.",
                    "headers": {"Location": {"schema": {"type": "string"},
                                             "description": "/status/{run_id}"}},
                    "content": _json(_ref("RunAccepted"))},
        }, **_errors(*_COMMON, 404, 408, 411, 413, 415, 422, 429, 503, 507)),
    }


def _paths():
    return {
        "/run/{pipeline_id}": {"post": _run_operation()},
        "/status/{run_id}": {"get": {
            "summary": "A run's stored result", "operationId": "getRunStatus",
            "parameters": [_id_param("run_id", "The run id from POST /run.")],
            "responses": dict({"200": _ok("The run's record.", _ref("RunResult"))},
                              **_errors(*_COMMON, 404)),
        }},
        "/runs": {"get": {
            "summary": "Recent runs, newest first", "operationId": "listRuns",
            "parameters": [
                _query("status", {"type": "string", "enum": _STATUSES}, "Filter by status."),
                _query("pipeline", {"type": "string", "pattern": _ID_PATTERN,
                                    "maxLength": 128}, "Filter by pipeline id."),
                _query("sync_state", {"type": "string", "enum": _SYNC_STATES},
                       "Filter by sync state."),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000,
                                 "default": 50}, "At most this many runs."),
            ],
            "responses": dict({"200": _ok("Run summaries.", _ref("RunList"))},
                              **_errors(*_COMMON)),
        }},
        "/pipelines": {"get": {
            "summary": "Cached pipelines", "operationId": "listPipelines",
            "responses": dict({"200": _ok("Pipelines on this device.",
                                          _ref("PipelineList"))}, **_errors(*_COMMON)),
        }},
        "/health": {"get": {
            "summary": "Liveness and readiness", "operationId": "health",
            "description": "No token needed. Details (checks) only with a valid token or "
                           "when no token is configured. Never calls the network.",
            "security": [{}, {"bearerAuth": []}],
            "responses": dict({"200": _ok("Alive and ready.", _ref("Health")),
                               "503": _ok("Alive but not ready (store unavailable).",
                                          _ref("Health"))},
                              **_errors(400, 403, 421)),
        }},
        "/sync": {"post": {
            "summary": "Sync with the cloud now", "operationId": "syncNow",
            "description": "Runs one pass through runtime.sync_now(): the background "
                           "manager's when it runs, else a locked one-off pass. A pass "
                           "that fails answers the error shape with the pass's `report`.",
            "responses": dict({"200": _ok("The pass finished.", _ref("SyncReport"))},
                              **_errors(*_COMMON, 429, 502, 503)),
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics", "operationId": "metrics",
            "responses": dict({"200": {"description": "Text format 0.0.4.", "content": {
                "text/plain": {"schema": {"type": "string"}}}}}, **_errors(*_COMMON)),
        }},
        "/openapi.json": {"get": {
            "summary": "This document", "operationId": "openapi",
            "responses": dict({"200": _ok("OpenAPI 3.0.", {"type": "object"})},
                              **_errors(*_COMMON)),
        }},
    }


def openapi_document(version):
    """The whole OpenAPI 3.0.3 document for fm-edge ``version``."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "fm-edge local API", "version": version,
                 "description": "Runs FlowMason pipelines on this device. Every endpoint "
                                "but /health needs `Authorization: Bearer <api_token>` when "
                                "an api_token is configured (required for non-loopback "
                                "binds). Errors are {\"error\": {\"code\", \"message\"}}."},
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "The device's api_token."}},
            "schemas": _schemas(),
            "responses": _error_responses(),
        },
    }
