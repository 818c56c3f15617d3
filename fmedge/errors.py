"""The error hierarchy: one root, a few subclasses users catch.

Every error carries three things the interfaces need so they never guess:
``code`` (a stable machine name, used in HTTP error bodies), ``exit_code`` (what the
CLI exits with) and ``retryable`` (whether trying again later can succeed).
Messages say what happened, to what, and what to do next.
"""


class FmEdgeError(Exception):
    """Root of every error fm-edge raises on purpose."""

    code = "error"
    exit_code = 1
    retryable = False
    http_status = 500

    def __init__(self, message, *, code=None, retryable=None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    @property
    def message(self):
        return str(self)


class UsageError(FmEdgeError):
    """Bad input from the user: a flag, a file, a JSON document, an id."""

    code = "bad_request"
    exit_code = 2
    http_status = 400


class ConfigError(UsageError):
    """A configuration key or value that cannot be used."""

    code = "config_error"


class InvalidIdError(UsageError):
    """A pipeline, run or model id that is not safe to use as a key or a file name."""

    code = "invalid_id"


class PipelineValidationError(UsageError):
    """A pipeline document that fm-edge refuses to store or run."""

    code = "invalid_pipeline"


class NotFoundError(FmEdgeError):
    """A pipeline, run or model that is not on this device."""

    code = "not_found"
    exit_code = 2
    http_status = 404


class StorageError(FmEdgeError):
    """The device's storage cannot take the write (full, read-only, unwritable)."""

    code = "storage_error"
    exit_code = 2
    http_status = 507


class StoreFullError(StorageError):
    """The result store reached ``result_store_max_mb`` under the ``reject_new`` policy."""

    code = "store_full"


class BusyError(FmEdgeError):
    """Too much work already queued, or a lock held by another process."""

    code = "busy"
    exit_code = 4
    retryable = True
    http_status = 429


class OfflineError(FmEdgeError):
    """The cloud (or a local backend) cannot be reached right now."""

    code = "offline"
    exit_code = 3
    retryable = True
    http_status = 503


class AuthError(FmEdgeError):
    """The cloud refused the api_key: retrying will not help until it is fixed."""

    code = "auth_failed"
    exit_code = 5
    http_status = 401


class ExecutionError(FmEdgeError):
    """A pipeline stage failed while running."""

    code = "execution_error"


class StageTimeoutError(ExecutionError):
    """A stage attempt or a whole run ran past its time limit."""

    code = "timeout"
    retryable = True


class CancelledError(ExecutionError):
    """A run was cancelled by the user or by shutdown."""

    code = "cancelled"


class ExpressionError(ExecutionError):
    """A template or expression that cannot be evaluated safely."""

    code = "expression_error"


class TemplateError(ExpressionError):
    """A template path that does not resolve (names the missing path)."""

    code = "template_error"


class LLMError(ExecutionError):
    """A local LLM backend failed; usually worth retrying."""

    code = "llm_error"
    retryable = True


class ModelNotFoundError(LLMError):
    """The backend does not have the requested model; retrying will not help."""

    code = "model_not_found"
    retryable = False


class BackendUnavailableError(LLMError):
    """The backend is not installed or not running."""

    code = "backend_unavailable"
