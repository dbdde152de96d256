"""Mapping between HybridRAG objects / exceptions and the API's schemas / HTTP errors."""

from __future__ import annotations

import math
from typing import Any

from fastapi import HTTPException, status

from api.schemas import AnswerResponse, Decision, Source, Usage


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def source_of(hit: Any) -> Source:
    """A hybrid source / retrieval SearchHit -> API Source (chunk fields may sit on ``hit.chunk``)."""
    chunk = getattr(hit, "chunk", hit)
    scores = getattr(hit, "scores", None) or {}
    return Source(
        doc_id=str(getattr(hit, "doc_id", None) or getattr(chunk, "doc_id", "")),
        chunk_id=str(getattr(hit, "chunk_id", None) or getattr(chunk, "id", "")),
        text=str(getattr(hit, "text", None) or getattr(chunk, "text", "")),
        score=_num(getattr(hit, "score", 0.0)) or 0.0,
        scores={str(k): _num(v) for k, v in dict(scores).items()},
        start=int(getattr(hit, "start", None) or getattr(chunk, "start", 0) or 0),
        end=int(getattr(hit, "end", None) or getattr(chunk, "end", 0) or 0),
        cited=bool(getattr(hit, "cited", False)),
    )


def decision_of(answer: Any) -> Decision:
    d = getattr(answer, "decision", None)
    route = str(getattr(answer, "route", "") or getattr(d, "route", ""))
    if d is None:
        return Decision(route=route, confidence=1.0, reason="route forced by the request")
    return Decision(
        route=str(getattr(d, "route", route)),
        confidence=_num(getattr(d, "confidence", 1.0)) or 0.0,
        reason=str(getattr(d, "reason", "")),
    )


def usage_of(answer: Any) -> Usage:
    u = getattr(answer, "usage", None) or {}
    if not isinstance(u, dict):
        u = {k: getattr(u, k, 0) for k in ("prompt_tokens", "completion_tokens")}
    p, c = int(u.get("prompt_tokens", 0) or 0), int(u.get("completion_tokens", 0) or 0)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def timings_of(answer: Any) -> dict[str, float]:
    t = getattr(answer, "timings", None) or {}
    return {str(k): f for k, v in dict(t).items() if (f := _num(v)) is not None}


def answer_response(answer: Any, request_id: str) -> AnswerResponse:
    return AnswerResponse(
        request_id=request_id,
        answer=str(getattr(answer, "text", "")),
        route=str(getattr(answer, "route", "")),
        decision=decision_of(answer),
        sources=[source_of(s) for s in getattr(answer, "sources", None) or []],
        timings=timings_of(answer),
        usage=usage_of(answer),
    )


def http_error(e: Exception) -> HTTPException:
    """HybridRAG's input errors -> 4xx with the library's message; anything else is re-raised as is.

    hybrid and retrieval make every bad-input error a ``ValueError`` subclass (-> 422); answering before
    anything was ingested is ``NotIngestedError`` (-> 409).
    """
    from hybrid.errors import NotIngestedError

    msg = str(e) or type(e).__name__
    if isinstance(e, NotIngestedError):
        return HTTPException(status.HTTP_409_CONFLICT, detail=f"{msg} (POST /v1/documents first)")
    if isinstance(e, ValueError):
        return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=msg)
    raise e
