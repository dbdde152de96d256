"""Unit tests of the API's bounded worker pool and persisted ingest jobs (no model needed).

Run: .venv/bin/python -m pytest -q tests/test_api_workers.py
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from api.deps import keys_match
from api.jobs import IngestWorker, JobNotFound, JobStore
from api.workers import Saturated, ShuttingDown, WorkerPool


def test_pool_refuses_beyond_capacity_and_frees_slots_when_work_ends() -> None:
    pool = WorkerPool(workers=1, queue_size=1)
    gate = threading.Event()
    f1 = pool.submit(gate.wait)  # running
    f2 = pool.submit(gate.wait)  # waiting
    assert pool.depth == 2
    with pytest.raises(Saturated):
        pool.submit(time.sleep, 0)
    gate.set()
    assert f1.result(5) and f2.result(5)
    deadline = time.time() + 5
    while pool.depth and time.time() < deadline:
        time.sleep(0.01)
    assert pool.depth == 0
    assert pool.submit(lambda: 42).result(5) == 42
    pool.shutdown()


def test_pool_timeout_keeps_slot_until_thread_finishes() -> None:
    pool = WorkerPool(workers=1, queue_size=0)
    gate = threading.Event()

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await pool.run(gate.wait, timeout=0.05)
        # The thread still runs: the slot must still be taken.
        with pytest.raises(Saturated):
            pool.submit(time.sleep, 0)
        gate.set()
        await asyncio.sleep(0.1)
        assert await pool.run(lambda: "ok", timeout=5) == "ok"

    asyncio.run(main())
    pool.shutdown()


def test_pool_shutdown_finishes_in_flight_work_and_refuses_new() -> None:
    pool = WorkerPool(workers=2, queue_size=2)
    done: list[int] = []

    def work(i: int) -> None:
        time.sleep(0.1)
        done.append(i)

    for i in range(4):
        pool.submit(work, i)
    pool.shutdown(wait=True)
    assert sorted(done) == [0, 1, 2, 3]
    with pytest.raises(ShuttingDown):
        pool.submit(work, 9)


def test_pool_stream_yields_items_and_stops_producer_on_early_close() -> None:
    pool = WorkerPool(workers=1, queue_size=0)
    produced: list[int] = []

    def gen():
        for i in range(10_000):
            produced.append(i)
            yield i

    async def main() -> list[int]:
        got = []
        it = pool.stream(gen, buffer=2)
        async for x in it:
            got.append(x)
            if len(got) == 3:
                break
        await it.aclose()
        return got

    assert asyncio.run(main()) == [0, 1, 2]
    deadline = time.time() + 5
    while pool.depth and time.time() < deadline:
        time.sleep(0.01)
    assert pool.depth == 0, "producer thread kept its slot after the consumer left"
    assert len(produced) < 100, f"producer ran on after the client left ({len(produced)} items)"
    pool.shutdown()


def test_pool_stream_reraises_producer_error() -> None:
    pool = WorkerPool(workers=1, queue_size=0)

    def gen():
        yield "a"
        raise ValueError("boom")

    async def main() -> list[str]:
        out = []
        async for x in pool.stream(gen):
            out.append(x)
        return out

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(main())
    pool.shutdown()


def test_keys_match_is_exact() -> None:
    keys = ("alpha", "beta-key")
    assert keys_match("beta-key", keys) and keys_match("alpha", keys)
    for bad in ("", "alph", "alpha ", "ALPHA", "beta-key\x00", "gamma"):
        assert not keys_match(bad, keys), bad


def test_jobs_run_in_order_and_persist_status(tmp_path) -> None:
    store = JobStore(tmp_path)
    seen: list[list[tuple[str, str]]] = []
    worker = IngestWorker(store, lambda docs: seen.append(docs), max_pending=4)
    worker.start()
    a = worker.submit([{"id": "a", "text": "x", "metadata": None}])
    b = worker.submit([{"id": "b", "text": "y", "metadata": None}])
    assert a and b
    deadline = time.time() + 5
    while store.get(b["job_id"])["status"] != "done" and time.time() < deadline:
        time.sleep(0.01)
    worker.shutdown()
    assert seen == [[("a", "x")], [("b", "y")]]
    rec = JobStore(tmp_path).get(a["job_id"])  # a fresh store reads it back from disk
    assert rec["status"] == "done" and rec["attempts"] == 1
    assert not (tmp_path / f"{a['job_id']}.docs.json").exists(), "payload kept after the job was done"
    with pytest.raises(JobNotFound):
        store.get("../etc/passwd")


def test_jobs_failure_is_recorded(tmp_path) -> None:
    store = JobStore(tmp_path)

    def fail(docs):
        raise ValueError("bad doc")

    worker = IngestWorker(store, fail, max_pending=1)
    worker.start()
    rec = worker.submit([{"id": "a", "text": "x", "metadata": None}])
    deadline = time.time() + 5
    while store.get(rec["job_id"])["status"] not in ("done", "failed") and time.time() < deadline:
        time.sleep(0.01)
    worker.shutdown()
    got = store.get(rec["job_id"])
    assert got["status"] == "failed" and "bad doc" in got["error"]


def test_ingest_queue_bound(tmp_path) -> None:
    store = JobStore(tmp_path)
    gate = threading.Event()
    worker = IngestWorker(store, lambda docs: gate.wait(5), max_pending=2)
    worker.start()
    assert worker.submit([{"id": "a", "text": "x", "metadata": None}])
    assert worker.submit([{"id": "b", "text": "x", "metadata": None}])
    assert worker.submit([{"id": "c", "text": "x", "metadata": None}]) is None
    gate.set()
    worker.shutdown()


def test_recover_requeues_unfinished_and_fails_exhausted(tmp_path) -> None:
    store = JobStore(tmp_path, max_attempts=2)
    running = store.create([{"id": "a", "text": "x", "metadata": None}])
    store.update(running["job_id"], status="running", attempts=1)
    exhausted = store.create([{"id": "b", "text": "y", "metadata": None}])
    store.update(exhausted["job_id"], status="running", attempts=2)
    done = store.create([{"id": "c", "text": "z", "metadata": None}])
    store.update(done["job_id"], status="done")
    (tmp_path / ".garbage.tmp").write_text("{")  # a torn temp file from a crash is ignored

    again = JobStore(tmp_path, max_attempts=2)
    todo = again.recover()
    assert todo == [running["job_id"]]
    assert again.get(running["job_id"])["status"] == "queued"
    assert again.get(exhausted["job_id"])["status"] == "failed"
    assert again.get(done["job_id"])["status"] == "done"
    assert json.loads((tmp_path / f"{running['job_id']}.docs.json").read_text())[0]["id"] == "a"
