"""Service state and FastAPI dependencies: the running HybridRAG, pools, jobs, metrics, and auth."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.jobs import IngestWorker, JobStore
from api.metrics import Metrics
from api.schemas import ErrorBody
from api.settings import Settings
from api.workers import WorkerPool

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Service:
    """Everything a request handler needs; built by ``create_app`` and filled in by its lifespan."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    rag: Any = None  # hybrid.HybridRAG once loaded
    pool: WorkerPool | None = None
    jobs: JobStore | None = None
    ingest: IngestWorker | None = None
    started: float = 0.0


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_ready_service(svc: ServiceDep) -> Service:
    """The service, or 503 while the model and store are still loading / already stopped."""
    if svc.rag is None or svc.pool is None or svc.ingest is None or svc.jobs is None:
        raise unavailable(svc.settings, "the model and store are not loaded yet")
    return svc


ReadyDep = Annotated[Service, Depends(get_ready_service)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` (TTT_RAG_API_KEYS)")


def keys_match(given: str, keys: tuple[str, ...]) -> bool:
    """Constant-time check of ``given`` against every configured key (no early exit)."""
    g = given.encode()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(g, k.encode())
    return ok


def require_key(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """401 unless a configured bearer key is presented; a no-op when no keys are configured."""
    keys = request.app.state.service.settings.keys
    if not keys:
        return
    if creds is None or creds.scheme.lower() != "bearer" or not keys_match(creds.credentials, keys):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key (send `Authorization: Bearer <key>`)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def unavailable(settings: Settings, why: str) -> HTTPException:
    """503 with ``Retry-After``: the client should back off and retry."""
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail=f"server busy: {why}; retry after {settings.retry_after_s}s",
        headers={"Retry-After": str(settings.retry_after_s)},
    )


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error codes a route can return (so the schema lists them)."""
    text = {
        400: "Malformed request body (not decodable)",
        401: "Missing or invalid API key",
        404: "Not found",
        409: "Nothing ingested yet",
        413: "Request body too large",
        415: "Unsupported content type",
        422: "Invalid request (limits, validation)",
        503: "Saturated or not ready; retry after `Retry-After` seconds",
        504: "Model work took longer than the request timeout",
    }
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}
