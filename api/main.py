"""The FastAPI app factory. Heavy work (model, store) happens in the lifespan, not at import."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api import service
from api.deps import Service
from api.metrics import ServiceMiddleware
from api.routers import answer, chat, documents, health, jobs
from api.settings import Settings


def create_app(settings: Settings | None = None, rag: Any | None = None) -> FastAPI:
    """The service app. ``rag``: a built HybridRAG, or a zero-argument factory called at start-up;
    None = ``HybridRAG.from_pretrained(settings.model_dir, settings.store_dir)`` at start-up."""
    svc = Service(settings=settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(service.start, svc, rag)
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop, svc)

    app = FastAPI(
        title="ttt-rag",
        version="0.1.0",
        summary="Hybrid RAG: TTT-E2E corpus memory + exact BM25/dense retrieval",
        lifespan=lifespan,
        generate_unique_id_function=lambda r: f"{r.tags[0]}-{r.name}" if r.tags else r.name,
    )
    app.state.service = svc
    for r in (answer.router, chat.router, documents.router, jobs.router, health.router):
        app.include_router(r)
    app.add_middleware(ServiceMiddleware, metrics=svc.metrics, max_body_bytes=svc.settings.max_body_bytes)
    return app
