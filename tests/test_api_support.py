"""Helpers shared by the API tests (no tests here): a tiny real HybridRAG, a loopback server, polling."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

from api.main import create_app
from api.settings import Settings

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def debug_model_dir(path: Path) -> Path:
    """A random ``debug`` TTT model + byte-level tokenizer saved to ``path`` (fast on CPU)."""
    from eval.bench_api import debug_model_dir as make

    if not (path / "config.json").exists():
        make(path)
    return path


def rule_router() -> Any:
    """A real ``router.Router`` driven by rules only (no classifier, no embedder): summaries ->
    comprehension, everything else -> lookup."""
    from router import Router

    return Router(rules=[("summar|overall|theme", "comprehension"), (".", "lookup")])


def make_rag(store_dir: Path, model: Any = None) -> Any:
    """The real HybridRAG on hybrid's seeded random ``debug`` model with a BM25-only index (no embedder)."""
    from hybrid.rag import HybridConfig, HybridRAG, random_debug_model
    from retrieval import Index
    from ttt.tokenizer import Tokenizer

    index = (
        Index.open(store_dir)
        if (store_dir / "manifest.json").exists()
        else Index.create(store_dir, dense=False)
    )
    model = model if model is not None else random_debug_model(seed=0)
    return HybridRAG(
        model, Tokenizer.byte_level(), index, router=rule_router(), config=HybridConfig(search_mode="bm25")
    )


def settings_for(store_dir: Path, **kw: Any) -> Settings:
    base = {
        "store_dir": store_dir,
        "api_keys": API_KEY,
        "max_tokens_limit": 16,
        "default_max_tokens": 4,
        "max_question_chars": 200,
        "max_body_bytes": 64 * 1024,
        "workers": 2,
        "queue_size": 4,
        "ingest_queue_size": 2,
    }
    return Settings(**{**base, **kw})


def wait_job(get: Any, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` (``get`` = client.get) until done/failed."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        rec = get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if rec.get("status") in ("done", "failed"):
            return rec
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} not finished after {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """uvicorn serving ``create_app(settings, rag)`` on 127.0.0.1:<free port> in a thread."""

    def __init__(self, settings: Settings, rag: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings, rag),
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        t_end = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "server thread died during start-up"
            assert time.monotonic() < t_end, "server did not start in 30 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
