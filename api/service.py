"""Start-up and shutdown of the service: load HybridRAG, start the pools, recover jobs; drain on exit."""

from __future__ import annotations

import logging
import time
from typing import Any

from api.deps import Service
from api.jobs import IngestWorker, JobStore
from api.workers import WorkerPool

log = logging.getLogger(__name__)


def memory_version(rag: Any) -> int | None:
    """The current TTT corpus-memory version (0 before the first ingest)."""
    meta = rag.memory.head()
    return 0 if meta is None else int(meta.version)


def load_rag(svc: Service) -> Any:
    """HybridRAG from the settings (model dir None = the default shipped model)."""
    from hybrid import HybridRAG

    s = svc.settings
    log.info("loading model and store", extra={"model_dir": str(s.model_dir), "store_dir": str(s.store_dir)})
    return HybridRAG.from_pretrained(s.model_dir, s.store_dir)


def start(svc: Service, rag: Any | None) -> None:
    """Blocking part of the lifespan start (run in a thread)."""
    s = svc.settings
    if not s.keys:
        log.warning("TTT_RAG_API_KEYS is empty: authentication is OFF; every client can read and write")
    if rag is None:
        rag = load_rag(svc)
    elif not hasattr(rag, "answer") and callable(rag):  # a factory: build it now, inside the lifespan
        rag = rag()
    svc.rag = rag
    svc.jobs = JobStore(s.resolved_jobs_dir)
    svc.pool = WorkerPool(s.workers, s.queue_size)

    def on_done(report: Any) -> None:
        v = getattr(report, "version", None)
        if isinstance(v, int):
            svc.metrics.memory_version.set(v)

    svc.ingest = IngestWorker(svc.jobs, svc.rag.ingest, s.ingest_queue_size, on_done=on_done)
    svc.ingest.start(svc.jobs.recover())
    svc.started = time.time()
    log.info("service ready", extra={"workers": s.workers, "queue_size": s.queue_size})


def stop(svc: Service) -> None:
    """Graceful: refuse new work, finish in-flight answers and the running ingest job."""
    log.info("shutting down: finishing in-flight work")
    if svc.pool is not None:
        svc.pool.shutdown(wait=True)
    if svc.ingest is not None:
        svc.ingest.shutdown()
    svc.rag = None
    log.info("shutdown complete")
