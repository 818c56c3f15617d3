"""EdgeConfig: every setting, where it comes from, and how bad values are refused.

Precedence (design §4): defaults < ``config.json`` in ``data_dir`` < environment < flags.
The table ``FIELDS`` is the single description of each setting: its type, its default,
its allowed values, its environment variable and whether it is a secret. The CLI, the
README's table and validation all read it, so they cannot disagree.
"""

import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import defaults as D
from .errors import ConfigError
from .ollama_host import parse_ollama_host


@dataclass(frozen=True)
class FieldSpec:
    """How one setting is typed, checked, named in the environment and shown."""

    name: str
    kind: str                      # str | int | float | bool | list | choice | url | path
    help: str
    env: str = ""                  # environment variable; "" = FLOWMASON_EDGE_<NAME>
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: Tuple[str, ...] = ()
    secret: bool = False

    @property
    def env_var(self):
        return self.env or "FLOWMASON_EDGE_" + self.name.upper()

    def allowed(self):
        """Human description of the allowed values, for error messages and docs."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind in ("int", "float"):
            low = "" if self.minimum is None else f">= {_num(self.minimum)}"
            high = "" if self.maximum is None else f"<= {_num(self.maximum)}"
            word = "an integer" if self.kind == "int" else "a number"
            return " ".join(p for p in (word, low, "and" if low and high else "", high) if p)
        return {"bool": "true or false", "list": "a comma-separated list",
                "url": "an http:// or https:// URL (or empty)",
                "path": "a directory path"}.get(self.kind, "text")


def _num(value):
    return int(value) if float(value).is_integer() else value


_DAY = 86400.0
FIELDS: Tuple[FieldSpec, ...] = (
    FieldSpec("data_dir", "path", "Root of everything fm-edge keeps on the device.",
              env="FLOWMASON_EDGE_DATA_DIR"),
    FieldSpec("pipeline_cache_dir", "path", "Pipeline cache (default: DATA_DIR/pipelines)."),
    FieldSpec("model_cache_dir", "path", "Model files (default: DATA_DIR/models)."),
    FieldSpec("result_store_dir", "path", "Result store (default: DATA_DIR/results)."),
    FieldSpec("cloud_url", "url", "FlowMason Studio base URL; empty = offline only.",
              env="FLOWMASON_CLOUD_URL"),
    FieldSpec("api_key", "str", "Key the cloud knows this device by.",
              env="FLOWMASON_API_KEY", secret=True),
    FieldSpec("max_concurrent", "int", "Runs executing at once.", minimum=1, maximum=64),
    FieldSpec("execution_timeout", "float", "Seconds one run may take.",
              minimum=1, maximum=7 * _DAY),
    FieldSpec("max_queued_runs", "int", "Runs waiting for a slot before callers get 'busy'.",
              minimum=0, maximum=100000),
    FieldSpec("pipeline_cache_size_mb", "float", "Cap on cached cloud pipelines (MB).",
              minimum=0.001, maximum=1e6),
    FieldSpec("pipeline_ttl_days", "float",
              "Cloud pipelines unused this long are removed; 0 = never.", minimum=0,
              maximum=36500),
    FieldSpec("model_cache_size_gb", "float", "Cap on cached model files (GB).",
              minimum=0.001, maximum=1e5),
    FieldSpec("result_retention_days", "float",
              "Synced results older than this are deleted (pending ones never).",
              minimum=0, maximum=36500),
    FieldSpec("result_store_max_mb", "float", "Cap on the result store (MB).",
              minimum=1, maximum=1e7),
    FieldSpec("result_store_full_policy", "choice", "What happens when the store is full.",
              choices=D.RESULT_STORE_FULL_POLICIES),
    FieldSpec("min_free_disk_mb", "float", "Free space the stores always leave on the disk.",
              minimum=0, maximum=1e7),
    FieldSpec("sync_interval", "float", "Seconds between sync passes.", minimum=1,
              maximum=_DAY),
    FieldSpec("ping_interval", "float", "Seconds between reachability checks.", minimum=1,
              maximum=_DAY),
    FieldSpec("auto_sync", "bool", "Sync in the background while the runtime runs."),
    FieldSpec("ca_bundle", "str", "PEM file of extra CA certificates for the cloud's TLS."),
    FieldSpec("llm_backend", "choice", "Local LLM backend.", env="FLOWMASON_LLM_BACKEND",
              choices=D.LLM_BACKENDS),
    FieldSpec("llm_model", "str", "Model name (Ollama), model-cache name or path (llamacpp).",
              env="FLOWMASON_LLM_MODEL"),
    FieldSpec("llm_base_url", "url",
              "Backend URL; empty = the backend's default (OLLAMA_HOST for ollama)."),
    FieldSpec("llm_api_key", "str", "Bearer key for an OpenAI-compatible server (openai).",
              secret=True),
    FieldSpec("llm_threads", "int", "CPU threads for llama.cpp; 0 = all cores but one.",
              minimum=0, maximum=256),
    FieldSpec("llm_context", "int", "llama.cpp context size in tokens (n_ctx).",
              minimum=128, maximum=1048576),
    FieldSpec("llm_gpu_layers", "int",
              "Layers llama.cpp offloads to a GPU (Jetson: -1 = all, 0 = CPU only).",
              minimum=-1, maximum=10000),
    FieldSpec("device_id", "str", "This device's id; generated once and kept."),
    FieldSpec("device_name", "str", "Human name shown in the Studio (default: host name)."),
    FieldSpec("host", "str", "Address the local HTTP API binds."),
    FieldSpec("port", "int", "Port of the local HTTP API (0 = any free port).",
              minimum=0, maximum=65535),
    FieldSpec("api_token", "str", "Bearer token for the local HTTP API.", secret=True),
    FieldSpec("bundle_key", "str", "HMAC-SHA256 key signing exported bundles; when set, "
              "import refuses unsigned or wrongly signed ones.", secret=True),
    FieldSpec("env_allowlist", "list",
              "Environment variables pipelines may read as {{env.NAME}}."),
    FieldSpec("local_file_roots", "list",
              "Directories the local_file component may touch (default: DATA_DIR/files)."),
)
FIELD_BY_NAME: Dict[str, FieldSpec] = {spec.name: spec for spec in FIELDS}
DIR_FIELDS = {"pipeline_cache_dir": D.PIPELINE_CACHE_SUBDIR,
              "model_cache_dir": D.MODEL_CACHE_SUBDIR,
              "result_store_dir": D.RESULT_STORE_SUBDIR}


def default_data_dir():
    """The seed's /var/flowmason/edge for root or when it is usable; else ~/.flowmason/edge."""
    system = D.DEFAULT_DATA_DIR
    if _is_root() or _usable_dir(system):
        return system
    return os.path.expanduser(D.DEFAULT_USER_DATA_DIR)


def _is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _usable_dir(path):
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


@dataclass
class EdgeConfig:
    """All settings of one edge device. Construct directly (the seed's API) or ``load()``."""

    data_dir: str = ""
    pipeline_cache_dir: Optional[str] = None
    model_cache_dir: Optional[str] = None
    result_store_dir: Optional[str] = None
    cloud_url: str = D.DEFAULT_CLOUD_URL
    api_key: str = ""
    max_concurrent: int = D.DEFAULT_MAX_CONCURRENT
    execution_timeout: float = D.DEFAULT_EXECUTION_TIMEOUT
    max_queued_runs: int = D.DEFAULT_MAX_QUEUED_RUNS
    pipeline_cache_size_mb: float = D.DEFAULT_PIPELINE_CACHE_SIZE_MB
    pipeline_ttl_days: float = D.DEFAULT_PIPELINE_TTL_DAYS
    model_cache_size_gb: float = D.DEFAULT_MODEL_CACHE_SIZE_GB
    result_retention_days: float = D.DEFAULT_RESULT_RETENTION_DAYS
    result_store_max_mb: float = D.DEFAULT_RESULT_STORE_MAX_MB
    result_store_full_policy: str = D.DEFAULT_RESULT_STORE_FULL_POLICY
    min_free_disk_mb: float = D.DEFAULT_MIN_FREE_DISK_MB
    sync_interval: float = D.DEFAULT_SYNC_INTERVAL
    ping_interval: float = D.DEFAULT_PING_INTERVAL
    auto_sync: bool = D.DEFAULT_AUTO_SYNC
    ca_bundle: str = ""
    llm_backend: str = D.DEFAULT_LLM_BACKEND
    llm_model: str = D.DEFAULT_LLM_MODEL
    llm_base_url: str = D.DEFAULT_LLM_BASE_URL
    llm_api_key: str = ""
    llm_threads: int = D.DEFAULT_LLM_THREADS
    llm_context: int = D.DEFAULT_LLM_CONTEXT
    llm_gpu_layers: int = D.DEFAULT_LLM_GPU_LAYERS
    device_id: str = ""
    device_name: str = ""
    host: str = D.DEFAULT_HOST
    port: int = D.DEFAULT_PORT
    api_token: str = ""
    bundle_key: str = ""
    env_allowlist: List[str] = field(default_factory=list)
    local_file_roots: List[str] = field(default_factory=list)
    # Where each effective value came from (default/file/env/flag); not a setting.
    sources: Dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for spec in FIELDS:
            value = getattr(self, spec.name)
            if value is not None or spec.name not in DIR_FIELDS:
                object.__setattr__(self, spec.name, check_value(spec, value))
        if not self.data_dir:
            self.data_dir = default_data_dir()
        self.data_dir = os.path.abspath(os.path.expanduser(self.data_dir))
        for name, subdir in DIR_FIELDS.items():
            value = getattr(self, name)
            path = os.path.join(self.data_dir, subdir) if not value else value
            setattr(self, name, os.path.abspath(os.path.expanduser(path)))

    @classmethod
    def load(cls, data_dir=None, env=None, flags=None):
        """Build the effective configuration: defaults < config file < env < flags."""
        env = os.environ if env is None else env
        flags = dict(flags or {})
        if data_dir:
            flags["data_dir"] = data_dir
        root = flags.get("data_dir") or _env_data_dir(env) or default_data_dir()
        layers = [("file", read_config_file(config_path(root))),
                  ("env", values_from_env(env)),
                  ("flag", {k: check_value(FIELD_BY_NAME[k], v, "flag")
                            for k, v in _known(flags, "flag").items()})]
        merged, sources = {"data_dir": root}, {}
        for source, values in layers:
            merged.update(values)
            sources.update({key: source for key in values})
        _apply_ollama_host(merged, sources, env)
        config = cls(**merged)
        config.sources = {spec.name: sources.get(spec.name, "default") for spec in FIELDS}
        return config

    @property
    def config_file(self):
        return config_path(self.data_dir)

    def with_overrides(self, **changes):
        return replace(self, **changes)

    def effective_llm_base_url(self):
        """The URL the LLM adapter should use, backend defaults filled in."""
        if self.llm_base_url:
            return self.llm_base_url
        if self.llm_backend == "ollama":
            return parse_ollama_host("")
        return ""

    def as_dict(self, mask_secrets=True):
        """Every setting by name; secrets masked unless asked for."""
        out = {}
        for spec in FIELDS:
            value = getattr(self, spec.name)
            out[spec.name] = mask(value) if (spec.secret and mask_secrets) else value
        return out

    def __repr__(self):
        # A config is printed in tracebacks and logs: never let a secret through.
        shown = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"EdgeConfig({shown})"


def mask(secret):
    """'' stays ''; short secrets become '****'; long ones keep their last 4 characters."""
    if not secret:
        return ""
    return "****" if len(secret) < 12 else "****" + secret[-4:]


def config_path(data_dir):
    return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), D.CONFIG_FILE_NAME)


def _env_data_dir(env):
    return env.get(FIELD_BY_NAME["data_dir"].env_var, "").strip()


def values_from_env(env):
    """Settings given through environment variables, checked and typed."""
    values = {}
    for spec in FIELDS:
        raw = env.get(spec.env_var)
        if raw is not None and raw.strip() != "":
            values[spec.name] = check_value(spec, raw, f"environment variable {spec.env_var}")
    return values


def _apply_ollama_host(merged, sources, env):
    """OLLAMA_HOST is an env-level default for llm_base_url when the backend is Ollama."""
    raw = env.get("OLLAMA_HOST", "")
    backend = merged.get("llm_backend", D.DEFAULT_LLM_BACKEND)
    if raw.strip() and backend == "ollama" and sources.get("llm_base_url") not in ("env", "flag"):
        merged["llm_base_url"] = parse_ollama_host(raw)
        sources["llm_base_url"] = "env"


def _known(values, origin):
    for key in values:
        if key not in FIELD_BY_NAME:
            raise ConfigError(unknown_key_message(key, origin))
    return values


def unknown_key_message(key, origin="config"):
    known = ", ".join(spec.name for spec in FIELDS)
    return f"unknown {origin} key {key!r}: known keys are {known}"


def read_config_file(path):
    """The settings saved by ``fm-edge config set``; {} when there is no file yet."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}; fix or delete it") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object; fix or delete it")
    _known(data, f"config file {path}")
    if "data_dir" in data:
        raise ConfigError(f"config file {path} sets data_dir, which it cannot (the file "
                          "lives inside it): remove the key; use --data-dir or "
                          "FLOWMASON_EDGE_DATA_DIR")
    return {k: check_value(FIELD_BY_NAME[k], v, f"config file {path}") for k, v in data.items()}


def check_value(spec, value, origin="setting"):
    """Convert ``value`` (text from env/CLI, or a Python value) to the field's type."""
    try:
        converted = _CONVERTERS[spec.kind](value, spec)
    except (TypeError, ValueError) as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise ConfigError(f"{origin}: invalid value {value!r} for {spec.name}: "
                          f"expected {spec.allowed()}{detail}") from None
    _check_range(spec, converted, origin)
    return converted


def _check_range(spec, value, origin):
    too_low = spec.minimum is not None and value < spec.minimum
    too_high = spec.maximum is not None and value > spec.maximum
    if too_low or too_high:
        raise ConfigError(f"{origin}: value {value!r} for {spec.name} is out of range: "
                          f"expected {spec.allowed()}")


def _to_str(value, spec):
    if not isinstance(value, str):
        raise TypeError("")
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    return value.strip()


def _to_path(value, spec):
    return _to_str(value, spec)


def _to_int(value, spec):
    if isinstance(value, bool):
        raise TypeError("")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("")
    return int(value.strip() if isinstance(value, str) else value)


def _to_float(value, spec):
    if isinstance(value, bool):
        raise TypeError("")
    number = float(value.strip() if isinstance(value, str) else value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("")
    return number


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _to_bool(value, spec):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("")


def _to_list(value, spec):
    if isinstance(value, str):
        text = value.strip()
        items = json.loads(text) if text.startswith("[") else text.split(",")
    else:
        items = value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise TypeError("")
    return [item.strip() for item in items if item.strip()]


def _to_choice(value, spec):
    text = _to_str(value, spec).lower()
    if text not in spec.choices:
        raise ValueError("")
    return text


def _to_url(value, spec):
    text = _to_str(value, spec).rstrip("/")
    if text and not (text.startswith("http://") or text.startswith("https://")):
        raise ValueError("")
    if text and not text.split("://", 1)[1].split("/")[0]:
        raise ValueError("no host")
    return text


_CONVERTERS: Dict[str, Callable[[Any, FieldSpec], Any]] = {
    "str": _to_str, "path": _to_path, "int": _to_int, "float": _to_float, "bool": _to_bool,
    "list": _to_list, "choice": _to_choice, "url": _to_url,
}


def public_field_names():
    return [spec.name for spec in FIELDS]


def dataclass_field_names():
    return [f.name for f in fields(EdgeConfig) if f.name != "sources"]


# -- the config file, as edited by `fm-edge config set|unset` --------------------------

def set_config_value(data_dir, key, raw_value):
    """Check ``raw_value`` for ``key`` and save it in the config file (mode 0600)."""
    spec = _settable(key)
    value = check_value(spec, raw_value, "config set")
    path = config_path(data_dir)
    values = _raw_file(path)
    values[key] = value
    _write_config_file(path, values)
    return value


def unset_config_value(data_dir, key):
    """Remove ``key`` from the config file; True if it was there."""
    _settable(key)
    path = config_path(data_dir)
    values = _raw_file(path)
    present = values.pop(key, None) is not None
    if present:
        _write_config_file(path, values)
    return present


def _settable(key):
    spec = FIELD_BY_NAME.get(key)
    if spec is None:
        raise ConfigError(unknown_key_message(key))
    if key == "data_dir":
        raise ConfigError("data_dir cannot be saved in the config file, which lives inside "
                          "it: use --data-dir or FLOWMASON_EDGE_DATA_DIR")
    return spec


def _raw_file(path):
    read_config_file(path)  # refuses a broken file before we rewrite it
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {}


def _write_config_file(path, values):
    from .fsutil import atomic_write

    text = json.dumps(values, indent=2, sort_keys=True) + "\n"
    # 0600: the file holds the api_key and the api_token.
    atomic_write(path, text.encode("utf-8"), mode=0o600)
