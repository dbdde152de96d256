"""Open operational endpoints: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse

from api.deps import ServiceDep
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health, "description": "not ready"}})
def readyz(svc: ServiceDep) -> Any:
    """Ready when the model and store are loaded and the ingest thread runs."""
    detail = {
        "model_loaded": svc.rag is not None,
        "ingest_thread": bool(svc.ingest and svc.ingest.alive),
        "worker_queue_depth": svc.pool.depth if svc.pool else None,
    }
    ok = all(v for k, v in detail.items() if k != "worker_queue_depth")
    body = Health(status="ready" if ok else "not ready", detail=detail)
    if ok:
        return body
    return JSONResponse(body.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
)
def metrics(svc: ServiceDep) -> Response:
    """Prometheus text format: requests, latency by route, queue depths, memory version."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    m = svc.metrics
    m.worker_queue.set(svc.pool.depth if svc.pool else 0)
    m.ingest_queue.set(svc.ingest.depth if svc.ingest else 0)
    if svc.rag is not None:
        from api.service import memory_version

        v = memory_version(svc.rag)
        if v is not None:
            m.memory_version.set(v)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
