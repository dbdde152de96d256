"""Running HybridRAG answers on the worker pool, with limits, timeouts and error mapping.

Shared by ``/v1/answer`` and ``/v1/chat/completions``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, status

from api.convert import http_error
from api.deps import Service, unavailable
from api.workers import Saturated, ShuttingDown

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class AnswerCall:
    """One validated answer request, whatever endpoint it came from."""

    question: str
    route: str = "auto"
    top_k: int = 4
    max_tokens: int | None = None
    temperature: float | None = None  # None = HybridRAG's default (greedy)
    stop: list[str] | None = None
    answer_start: str = ""  # text the answer begins with; the reply is its continuation


def validate_call(svc: Service, call: AnswerCall) -> AnswerCall:
    """Apply the configured limits; 422 with a message naming the limit."""
    s = svc.settings
    q = call.question.strip()
    if not q:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail="question is empty")
    n_chars = len(call.question) + len(call.answer_start)
    if n_chars > s.max_question_chars:
        what = "question and answer_start have" if call.answer_start else "question has"
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"{what} {n_chars} characters; the limit is {s.max_question_chars} "
            "(TTT_RAG_MAX_QUESTION_CHARS)",
        )
    if call.max_tokens is not None and call.max_tokens > s.max_tokens_limit:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"max_tokens={call.max_tokens} exceeds the limit of {s.max_tokens_limit} "
            "(TTT_RAG_MAX_TOKENS_LIMIT)",
        )
    if call.top_k > s.max_top_k:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"top_k={call.top_k} exceeds the limit of {s.max_top_k} (TTT_RAG_MAX_TOP_K)",
        )
    max_tokens = call.max_tokens if call.max_tokens is not None else s.default_max_tokens
    return AnswerCall(
        question=q,
        route=call.route,
        top_k=call.top_k,
        max_tokens=max_tokens,
        temperature=call.temperature,
        stop=call.stop,
        answer_start=call.answer_start,
    )


def _kwargs(call: AnswerCall) -> dict[str, Any]:
    return {
        "route": call.route,
        "top_k": call.top_k,
        "max_new_tokens": call.max_tokens,
        "temperature": call.temperature,
        "stop": call.stop,
        "answer_start": call.answer_start,
    }


async def answer_once(svc: Service, call: AnswerCall) -> Any:
    """``rag.answer`` on a worker: 503 when saturated, 504 after the timeout, 4xx for bad input."""
    assert svc.pool is not None, "service not started"
    try:
        return await svc.pool.run(
            svc.rag.answer, call.question, timeout=svc.settings.request_timeout_s, **_kwargs(call)
        )
    except (Saturated, ShuttingDown) as e:
        svc.metrics.rejected.labels("answer").inc()
        raise unavailable(svc.settings, str(e)) from e
    except TimeoutError as e:
        raise HTTPException(
            status.HTTP_504_GATEWAY_TIMEOUT,
            detail=f"answer took longer than {svc.settings.request_timeout_s}s (TTT_RAG_REQUEST_TIMEOUT_S)",
        ) from e
    except HTTPException:
        raise
    except Exception as e:
        raise http_error(e) from e


async def answer_stream(svc: Service, call: AnswerCall) -> AsyncIterator[Any]:
    """``rag.answer_stream`` on a worker: text pieces (str), then the final Answer.

    The first item is awaited here, so saturation and bad input surface as HTTP errors before any
    response byte is sent; later failures surface from the returned iterator.
    """
    assert svc.pool is not None, "service not started"

    def make_iter() -> Iterator[Any]:
        return iter(svc.rag.answer_stream(call.question, **_kwargs(call)))

    try:
        items = svc.pool.stream(make_iter, stall_s=svc.settings.request_timeout_s)
    except (Saturated, ShuttingDown) as e:
        svc.metrics.rejected.labels("answer_stream").inc()
        raise unavailable(svc.settings, str(e)) from e
    try:
        first = await asyncio.wait_for(items.__anext__(), svc.settings.request_timeout_s)
    except StopAsyncIteration:
        first = None
    except TimeoutError as e:
        await items.aclose()
        raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT, detail="answer stream timed out") from e
    except Exception as e:
        await items.aclose()
        raise http_error(e) from e
    return _prepend(first, items)


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        if first is not None:
            yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
