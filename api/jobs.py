"""Ingest jobs: persisted records and the single ingest thread that runs them.

A job is written to ``jobs_dir/<job_id>.json`` (status) and ``<job_id>.docs.json`` (the documents)
before ``POST /v1/documents`` answers 202, with atomic replace + fsync. The ingest thread runs jobs
one at a time through ``HybridRAG.ingest`` (whose store writes are themselves atomic). Only a job whose
status is ``done`` is acknowledged: its documents are in the store. After a crash, jobs that were
``queued`` or ``running`` are re-queued on start-up (ingesting the same id again is an update, so a
re-run is safe) until ``max_attempts`` is reached, then marked ``failed``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_STOP = object()


class JobNotFound(KeyError):
    """No job with that id."""


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class JobStore:
    """Job records on disk, one JSON file per job."""

    def __init__(self, root: Path, max_attempts: int = 3) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self._lock = threading.Lock()

    def _rec(self, job_id: str) -> Path:
        return self.root / f"{job_id}.json"

    def _docs(self, job_id: str) -> Path:
        return self.root / f"{job_id}.docs.json"

    def create(self, documents: list[dict[str, Any]]) -> dict[str, Any]:
        """Persist a new queued job holding ``documents`` ([{id, text, metadata}])."""
        job_id = uuid.uuid4().hex
        now = time.time()
        rec = {
            "job_id": job_id,
            "status": "queued",
            "document_ids": [d["id"] for d in documents],
            "created": now,
            "updated": now,
            "attempts": 0,
            "error": None,
            "result": None,
        }
        _write_json_atomic(self._docs(job_id), documents)
        _write_json_atomic(self._rec(job_id), rec)
        return rec

    def get(self, job_id: str) -> dict[str, Any]:
        if not JOB_ID_RE.match(job_id):
            raise JobNotFound(job_id)
        try:
            return json.loads(self._rec(job_id).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise JobNotFound(job_id) from e

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            rec = self.get(job_id)
            rec.update(fields, updated=time.time())
            _write_json_atomic(self._rec(job_id), rec)
        if rec["status"] in ("done", "failed"):
            self._docs(job_id).unlink(missing_ok=True)  # the store (or nobody) holds the text now
        return rec

    def documents(self, job_id: str) -> list[dict[str, Any]]:
        return json.loads(self._docs(job_id).read_text(encoding="utf-8"))

    def discard(self, job_id: str) -> None:
        """Forget a job that was never accepted (the queue refused it)."""
        self._rec(job_id).unlink(missing_ok=True)
        self._docs(job_id).unlink(missing_ok=True)

    def recover(self) -> list[str]:
        """Jobs left unfinished by a previous process, oldest first, re-marked ``queued``."""
        records = []
        for p in self.root.glob("*.json"):
            if p.name.endswith(".docs.json") or not JOB_ID_RE.match(p.stem):
                continue
            try:
                records.append(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as e:
                log.error("unreadable job record %s: %s", p, e)
        todo = []
        for rec in sorted(records, key=lambda r: r["created"]):
            if rec["status"] not in ("queued", "running"):
                continue
            jid = rec["job_id"]
            if not self._docs(jid).exists() or rec["attempts"] >= self.max_attempts:
                self.update(jid, status="failed", error="interrupted by a restart; please resubmit")
                continue
            self.update(jid, status="queued")
            todo.append(jid)
        if todo:
            log.warning("re-queued %d unfinished ingest jobs after restart", len(todo))
        return todo


class IngestWorker:
    """One thread that runs ingest jobs in order; at most ``max_pending`` waiting jobs."""

    def __init__(
        self,
        store: JobStore,
        ingest: Callable[[list[tuple[str, str]]], Any],
        max_pending: int,
        on_done: Callable[[Any], None] | None = None,
    ) -> None:
        self.store = store
        self._ingest = ingest
        self._on_done = on_done
        self.max_pending = max_pending
        self._q: queue.Queue[Any] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ttt-rag-ingest", daemon=True)

    @property
    def depth(self) -> int:
        return self._pending

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self, recovered: list[str] = ()) -> None:  # type: ignore[assignment]
        for jid in recovered:
            self._enqueue(jid)
        self._thread.start()

    def _enqueue(self, job_id: str) -> None:
        with self._lock:
            self._pending += 1
        self._q.put(job_id)

    def submit(self, documents: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Persist and queue a job; None when the queue is full or closing (caller answers 503)."""
        with self._lock:
            if self._closed or self._pending >= self.max_pending:
                return None
            self._pending += 1
        rec = self.store.create(documents)
        self._q.put(rec["job_id"])
        return rec

    def _loop(self) -> None:
        while True:
            job_id = self._q.get()
            if job_id is _STOP:
                return
            try:
                self._run(job_id)
            finally:
                with self._lock:
                    self._pending -= 1

    def _run(self, job_id: str) -> None:
        rec = self.store.update(job_id, status="running", attempts=self.store.get(job_id)["attempts"] + 1)
        t0 = time.perf_counter()
        try:
            docs = self.store.documents(job_id)
            report = self._ingest([(d["id"], d["text"]) for d in docs])
        except Exception as e:  # any failure is the job's, not the server's
            log.exception("ingest job %s failed", job_id)
            self.store.update(job_id, status="failed", error=f"{type(e).__name__}: {e}")
            return
        result = _report_dict(report)
        result["seconds"] = round(time.perf_counter() - t0, 4)
        self.store.update(job_id, status="done", error=None, result=result)
        log.info("ingest job done", extra={"job_id": job_id, "documents": len(rec["document_ids"])})
        if self._on_done is not None:
            self._on_done(report)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop after the job in progress; queued jobs stay persisted and resume on the next start."""
        with self._lock:
            self._closed = True
        # Drain the queue so the thread sees the stop marker right after its current job.
        drained = 0
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            drained += item is not _STOP
        self._q.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if drained:
            log.info("left %d queued ingest jobs for the next start", drained)


def _report_dict(report: Any) -> dict[str, Any]:
    """The JSON-safe summary of a HybridRAG IngestReport."""
    out: dict[str, Any] = {}
    for name in ("version", "chunks", "tokens_read", "doc_ids"):
        v = getattr(report, name, None)
        if isinstance(v, list | tuple):
            out[name] = len(v) if name == "chunks" else [str(x) for x in v]
        elif isinstance(v, int | float | str):
            out[name] = v
    timings = getattr(report, "timings", None)
    if isinstance(timings, dict):
        out["timings"] = {str(k): float(v) for k, v in timings.items() if isinstance(v, int | float)}
    return out
