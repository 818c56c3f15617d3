"""Every default in one place, with its unit and the reason for its value.

Other modules import these names instead of repeating numbers, so a default changes in
exactly one line (the way rq keeps its defaults).
"""

# -- Storage ---------------------------------------------------------------------------
# /var/flowmason/edge is what the seed document and the Docker image use; a user without
# root gets ~/.flowmason/edge instead (see config.default_data_dir).
DEFAULT_DATA_DIR = "/var/flowmason/edge"
DEFAULT_USER_DATA_DIR = "~/.flowmason/edge"
CONFIG_FILE_NAME = "config.json"
PIPELINE_CACHE_SUBDIR = "pipelines"
MODEL_CACHE_SUBDIR = "models"
RESULT_STORE_SUBDIR = "results"
PIPELINE_DB_NAME = "pipelines.db"
RESULT_DB_NAME = "results.db"

# -- Cloud -----------------------------------------------------------------------------
DEFAULT_CLOUD_URL = ""            # empty: offline-only until configured
DEFAULT_SYNC_INTERVAL = 60        # seconds between sync passes (seed)
DEFAULT_PING_INTERVAL = 30        # seconds between reachability checks (seed)
DEFAULT_AUTO_SYNC = True          # seed default

# -- Execution -------------------------------------------------------------------------
DEFAULT_MAX_CONCURRENT = 2        # runs at once (seed); a Pi has 4 cores and one LLM
DEFAULT_EXECUTION_TIMEOUT = 300   # seconds per run (seed)
DEFAULT_MAX_QUEUED_RUNS = 100     # runs waiting for a slot before callers get "busy"

# -- Caches ----------------------------------------------------------------------------
DEFAULT_PIPELINE_CACHE_SIZE_MB = 100   # seed
DEFAULT_PIPELINE_TTL_DAYS = 30         # counted from last use (seed)
DEFAULT_MODEL_CACHE_SIZE_GB = 50       # seed
DEFAULT_RESULT_RETENTION_DAYS = 30     # synced results older than this are deleted (seed)
# A cap on the result store, far below a small SD card's free space: SQLite in WAL mode
# cannot even DELETE once the disk is full (reliability.md T3), so we stop before that.
DEFAULT_RESULT_STORE_MAX_MB = 1024
DEFAULT_RESULT_STORE_FULL_POLICY = "reject_new"   # never lose a result silently
RESULT_STORE_FULL_POLICIES = ("reject_new", "drop_oldest")
# Bytes the store keeps free on the filesystem, whatever the cap says.
DEFAULT_MIN_FREE_DISK_MB = 16

# Seconds between housekeeping passes of a running runtime (result retention, pipeline
# cache TTL and size cap): hourly is plenty for day-granularity limits.
DEFAULT_MAINTENANCE_INTERVAL_S = 3600

# -- LLM -------------------------------------------------------------------------------
LLM_BACKENDS = ("ollama", "llamacpp", "openai")
DEFAULT_LLM_BACKEND = "ollama"     # seed
DEFAULT_LLM_MODEL = "llama2"       # seed
DEFAULT_LLM_BASE_URL = ""          # empty: the backend's own default (OLLAMA_HOST rules)
# 0 = all cores but one: llama.cpp slows down 6-40x when a thread shares its core with
# the rest of the device (measured on 2 cores, llm-backends bench).
DEFAULT_LLM_THREADS = 0
DEFAULT_LLM_CONTEXT = 2048         # tokens; small models on a Pi rarely need more
DEFAULT_LLM_GPU_LAYERS = 0         # CPU only unless configured (Jetson: -1)

# -- Local HTTP API --------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"         # loopback only unless an api_token is set
DEFAULT_PORT = 8080                # seed's `fm-edge serve --port 8080`

# -- Pipeline ids ----------------------------------------------------------------------
MAX_ID_LENGTH = 128                # ids become SQLite keys and file names in bundles

# -- SQLite ----------------------------------------------------------------------------
SQLITE_BUSY_TIMEOUT_MS = 5000      # how long a writer waits for another process's lock
