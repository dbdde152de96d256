"""``POST /v1/answer``: a question in, an answer with its route decision, sources and timings out.

With ``stream: true`` the reply is Server-Sent Events: ``event: token`` (``{"text": ...}``) per generated
piece, then ``event: done`` carrying the full AnswerResponse, or ``event: error``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from api.answering import AnswerCall, answer_once, answer_stream, validate_call
from api.convert import answer_response
from api.deps import ReadyDep, errors, require_key
from api.schemas import SSE_EVENT_SCHEMA, AnswerRequest, AnswerResponse

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["answer"], dependencies=[Depends(require_key)])


def tail(sent: str, final: str) -> str | None:
    """The part of the final text not streamed yet (the library may hold back a trailing partial
    character, then put its decoded form only in the final answer): streamed pieces always add up to
    the final ``answer``."""
    return final[len(sent) :] if final.startswith(sent) and len(final) > len(sent) else None


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.post(
    "/answer",
    response_model=AnswerResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
            "description": "JSON answer, or an SSE stream when `stream` is true",
        },
        **errors(400, 401, 409, 413, 422, 503, 504),
    },
)
async def answer(body: AnswerRequest, svc: ReadyDep, request: Request) -> Any:
    """Answer a question through the routed path (comprehension, lookup or fused)."""
    call = validate_call(
        svc,
        AnswerCall(
            question=body.question,
            route=body.route,
            top_k=body.top_k,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            answer_start=body.answer_start,
        ),
    )
    rid = request.scope["state"]["request_id"]
    if not body.stream:
        return answer_response(await answer_once(svc, call), rid)
    items = await answer_stream(svc, call)
    return StreamingResponse(_events(items, rid), media_type="text/event-stream")


async def _events(items: AsyncIterator[Any], rid: str) -> AsyncIterator[str]:
    sent = ""
    try:
        async for item in items:
            if isinstance(item, str):
                sent += item
                yield sse("token", {"text": item})
                continue
            if (rest := tail(sent, str(item.text))) is not None:
                yield sse("token", {"text": rest})
            yield sse("done", answer_response(item, rid).model_dump())
    except Exception as e:  # headers are sent: report in-band
        log.exception("answer stream failed")
        yield sse("error", {"detail": f"{type(e).__name__}: {e}"})
