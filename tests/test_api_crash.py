"""SIGKILL the server (a real ``ttt-rag serve`` subprocess on loopback) while an ingest job runs, restart
it on the same store: the store loads its previous version, every acknowledged document (job ``done``)
is present and answerable, and the interrupted job is re-run to completion. Then SIGTERM: clean exit.

Run: .venv/bin/python -m pytest -q tests/test_api_crash.py
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_api_support import API_KEY, AUTH, debug_model_dir, free_port, wait_job

REPO = Path(__file__).resolve().parents[1]
ACKED = [
    {"id": "anchor", "text": "The anchor of the ship Meridel weighs 4410 kilograms."},
    {"id": "bell", "text": "The harbor bell rings at dawn and at dusk."},
]
WORDS = "river castle lantern copper harbor meadow violin glacier orchard saddle".split()


def start(model: Path, store: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TTT_RAG_API_KEYS": API_KEY, "TTT_RAG_MAX_TOKENS_LIMIT": "8"}
    cmd = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(model), "--store", str(store), "--log-level", "info"]  # fmt: skip
    with open(log, "ab") as f:  # a file, not a pipe: a full pipe would block the server
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_ready(http: httpx.Client, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        assert proc.poll() is None, f"server exited: {log.read_text()[-3000:]}"
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not ready")


def memory_version(http: httpx.Client) -> float:
    line = next(
        ln for ln in http.get("/metrics").text.splitlines() if ln.startswith("ttt_rag_memory_version ")
    )
    return float(line.split()[1])


@pytest.mark.timeout(300)
def test_sigkill_during_ingest_keeps_acknowledged_documents(tmp_path: Path) -> None:
    model, store, port = debug_model_dir(tmp_path / "model"), tmp_path / "store", free_port()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=60)
    log = tmp_path / "server.log"
    proc = start(model, store, port, log)
    try:
        wait_ready(http, proc, log)
        acked = http.post("/v1/documents", json={"documents": ACKED}).json()["job_id"]
        assert wait_job(http.get, acked, timeout=120)["status"] == "done"
        version = memory_version(http)
        assert version >= 1
        rng = random.Random(0)
        big = " ".join(rng.choice(WORDS) for _ in range(300))
        inflight = http.post("/v1/documents", json={"documents": [{"id": "big", "text": big}]}).json()[
            "job_id"
        ]
        t_end, status = time.monotonic() + 60, "queued"
        while status == "queued" and time.monotonic() < t_end:
            status = http.get(f"/v1/jobs/{inflight}").json()["status"]
        assert status == "running", f"could not catch the job running (status {status})"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

        proc = start(model, store, port, log)
        wait_ready(http, proc, log)
        assert memory_version(http) >= version  # the store and corpus memory load their last good version
        docs = set(http.get("/v1/documents").json()["documents"])
        assert {"anchor", "bell"} <= docs
        assert http.get(f"/v1/jobs/{acked}").json()["status"] == "done"
        r = http.post("/v1/answer", json={"question": "How heavy is the Meridel anchor?", "route": "lookup",
                                          "top_k": 1, "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200 and r.json()["sources"][0]["doc_id"] == "anchor"
        r = http.post(
            "/v1/answer", json={"question": "Tell me about it.", "route": "comprehension", "max_tokens": 2}
        )
        assert r.status_code == 200, r.text
        # The interrupted job was persisted, so the restarted server runs it again.
        rec: dict[str, Any] = wait_job(http.get, inflight, timeout=120)
        assert rec["status"] == "done" and rec["attempts"] == 2
        assert "big" in http.get("/v1/documents").json()["documents"]

        proc.send_signal(signal.SIGTERM)  # graceful: finish in-flight work, then exit
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown
        lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
        assert "shutdown complete" in [ln["msg"] for ln in lines[-4:]], lines[-4:]
        assert not [ln for ln in lines if ln["level"] == "ERROR"], "errors in the server log"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        http.close()
