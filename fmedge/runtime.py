"""EdgeRuntime: wires configuration, stores and services together.

The CLI, the HTTP API and library users all go through one runtime, so they always
see the same stores opened the same way. Stores open lazily: ``fm-edge status`` opens
only what it reads, and nothing here touches the network.
"""

import logging
import os

from .config import EdgeConfig
from .device import ensure_device_id
from .fsutil import ensure_dir

log = logging.getLogger("fmedge.runtime")


class EdgeRuntime:
    """Everything one device runs, built from one :class:`EdgeConfig`."""

    def __init__(self, config=None, clock=None):
        self.config = config or EdgeConfig.load()
        self._clock = clock
        self._pipelines = None
        self._results = None
        self._executor = None
        self.sync = None           # the background SyncManager while started with auto_sync
        self._housekeeping = None  # the periodic maintenance task while started
        self.started = False

    # -- stores -------------------------------------------------------------------------

    @property
    def pipelines(self):
        if self._pipelines is None:
            from .cache.pipelines import PipelineCache

            cfg = self.config
            self._pipelines = PipelineCache(cfg.pipeline_cache_dir,
                                            max_size_mb=cfg.pipeline_cache_size_mb,
                                            ttl_days=cfg.pipeline_ttl_days,
                                            validator=pipeline_validator(self._cached_document),
                                            **self._clock_kw())
        return self._pipelines

    @property
    def results(self):
        if self._results is None:
            from .cache.results import ResultStore

            cfg = self.config
            self._results = ResultStore(cfg.result_store_dir,
                                        retention_days=cfg.result_retention_days,
                                        max_mb=cfg.result_store_max_mb,
                                        full_policy=cfg.result_store_full_policy,
                                        min_free_mb=cfg.min_free_disk_mb, **self._clock_kw())
        return self._results

    def _cached_document(self, pipeline_id):
        """Parents named by `extends` resolve against the cache (None if not cached)."""
        from .ids import is_valid_id

        return self.pipelines.get_now(pipeline_id) if is_valid_id(pipeline_id) else None

    @property
    def executor(self):
        """The one EdgeExecutor of this runtime (its limits hold across all callers)."""
        if self._executor is None:
            from .pipeline.executor import EdgeExecutor

            self._executor = EdgeExecutor(self.config, pipelines=self.pipelines,
                                          results=self.results, device_id=self.device_id,
                                          **self._clock_kw())
        return self._executor

    async def run(self, pipeline_id=None, inputs=None, **options):
        """Run a pipeline through the shared executor; see EdgeExecutor.execute."""
        return await self.executor.execute(pipeline_id=pipeline_id, inputs=inputs, **options)

    @property
    def device_id(self):
        return ensure_device_id(self.config)

    def _clock_kw(self):
        return {"clock": self._clock} if self._clock else {}

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self):
        """Open the stores, recover interrupted runs and apply retention. No network."""
        ensure_dir(self.config.data_dir)
        self.device_id  # noqa: B018  (made and kept on first start)
        recovered = self.results.recovered
        if recovered:
            log.warning("recovered %d runs interrupted by a previous crash", len(recovered))
        await self.maintain()
        import asyncio

        self._housekeeping = asyncio.ensure_future(self._maintain_periodically())
        if self.config.auto_sync and self.config.cloud_url:
            from .sync.manager import SyncManager

            # start() only schedules the loop: becoming ready needs no network call.
            self.sync = SyncManager.for_runtime(self)
            await self.sync.start()
        self.started = True
        return self

    async def sync_now(self):
        """One sync pass now: through the background manager, else a locked cron pass."""
        if self.sync is not None:
            return await self.sync.sync_now()
        from .aio import run_blocking
        from .sync.once import sync_once

        return (await run_blocking(sync_once, self)).to_dict()

    async def _maintain_periodically(self, interval=None):
        import asyncio

        from .defaults import DEFAULT_MAINTENANCE_INTERVAL_S
        from .errors import FmEdgeError

        while True:
            await asyncio.sleep(interval or DEFAULT_MAINTENANCE_INTERVAL_S)
            try:
                report = await self.maintain()
                log.info("housekeeping: %s", report)
            except FmEdgeError as error:   # a full disk must not end the daemon
                log.error("housekeeping failed: %s", error)

    async def maintain(self):
        """Periodic housekeeping: result retention and pipeline cache limits."""
        removed_results = await self.results.cleanup()
        removed_pipelines = await self.pipelines.cleanup()
        return {"results_deleted": removed_results, "pipelines_removed": removed_pipelines}

    async def stop(self):
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self.sync is not None:
            await self.sync.stop()
            self.sync = None
        if self._executor is not None:
            await self._executor.close()
            self._executor = None
        self.close()
        self.started = False

    def close(self):
        for store in (self._pipelines, self._results):
            if store is not None:
                store.close()
        self._pipelines = self._results = None

    # -- reports ------------------------------------------------------------------------

    def status(self):
        """What `fm-edge status` shows: data dir, stores, disk; secrets never included."""
        from .fsutil import free_bytes

        cfg = self.config
        ensure_dir(cfg.data_dir)
        return {
            "data_dir": cfg.data_dir,
            "config_file": cfg.config_file if os.path.exists(cfg.config_file) else None,
            "device_id": self.device_id,
            "cloud_url": cfg.cloud_url or None,
            "llm_backend": cfg.llm_backend,
            "llm_model": cfg.llm_model,
            "pipelines": len(self.pipelines.versions()),
            "results": self.results.stats(),
            "disk_free_bytes": free_bytes(cfg.data_dir),
        }


def pipeline_validator(lookup=None):
    """Full validation by the pipeline engine, loaded on the first document it checks."""
    def validate(document, pipeline_id):
        from .cache.pipelines import check_document_shape
        from .pipeline.document import validate_document

        check_document_shape(document, pipeline_id)
        return validate_document(document, pipeline_id=pipeline_id, lookup=lookup)
    return validate


async def create_runtime(config=None):
    """The seed's entry point: build a runtime from ``config`` and start it."""
    runtime = EdgeRuntime(config)
    return await runtime.start()
