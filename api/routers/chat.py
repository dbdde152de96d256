"""OpenAI-compatible ``POST /v1/chat/completions`` (with SSE streaming) and ``GET /v1/models``.

The question is the last user message. ``route`` and ``top_k`` may be sent as extra body fields; how the
answer was made (route, decision, sources) comes back in the extra ``ttt_rag`` field.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import StreamingResponse

from api.answering import AnswerCall, answer_once, answer_stream, validate_call
from api.convert import decision_of, source_of, timings_of, usage_of
from api.deps import ReadyDep, ServiceDep, errors, require_key
from api.routers.answer import tail
from api.schemas import (
    SSE_EVENT_SCHEMA,
    ChatChoice,
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    RagInfo,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_key)])


@router.get("/models", response_model=ModelList, responses=errors(401))
def list_models(svc: ServiceDep) -> ModelList:
    """The one model this server answers with."""
    return ModelList(data=[ModelCard(id=svc.settings.model_name, created=int(svc.started))])


def _question(body: ChatCompletionRequest) -> str:
    for m in reversed(body.messages):
        if m.role != "user":
            continue
        if isinstance(m.content, str):
            return m.content
        if m.content:
            return "\n".join(p.text for p in m.content if p.type == "text" and p.text)
    raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail="messages contain no user message")


def _rag_info(answer: Any) -> RagInfo:
    return RagInfo(
        route=str(getattr(answer, "route", "")),
        decision=decision_of(answer),
        sources=[source_of(s) for s in getattr(answer, "sources", None) or []],
        timings=timings_of(answer),
    )


def _finish(answer: Any, max_tokens: int | None) -> str:
    n = usage_of(answer).completion_tokens
    return "length" if max_tokens is not None and n >= max_tokens else "stop"


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
            "description": "a chat completion, or SSE `data:` chunks ending in `data: [DONE]`",
        },
        **errors(400, 401, 404, 409, 413, 422, 503, 504),
    },
)
async def chat_completions(body: ChatCompletionRequest, svc: ReadyDep) -> Any:
    """OpenAI chat completion answered by the hybrid RAG."""
    if body.model != svc.settings.model_name:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"model {body.model!r} does not exist; this server serves {svc.settings.model_name!r}",
        )
    max_tokens = body.max_completion_tokens or body.max_tokens
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and (len(stop) > 4 or not all(stop)):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail="stop takes 1 to 4 non-empty strings"
        )
    call = AnswerCall(
        question=_question(body),
        route=body.route,
        top_k=body.top_k,
        max_tokens=max_tokens,
        temperature=body.temperature,
        stop=stop,
    )
    call = validate_call(svc, call)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        ans = await answer_once(svc, call)
        return ChatCompletion(
            id=cid,
            created=created,
            model=body.model,
            choices=[
                ChatChoice(
                    index=0,
                    message=ChatCompletionMessage(content=str(ans.text)),
                    finish_reason=_finish(ans, call.max_tokens),
                )
            ],
            usage=usage_of(ans),
            ttt_rag=_rag_info(ans),
        )
    items = await answer_stream(svc, call)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}
    return StreamingResponse(
        _chunks(items, head, include_usage, call.max_tokens), media_type="text/event-stream"
    )


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _chunks(
    items: AsyncIterator[Any], head: dict[str, Any], include_usage: bool, max_tokens: int | None
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return _data({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    try:
        async for item in items:
            if isinstance(item, str):
                if item:
                    sent += item
                    yield chunk({"content": item})
                continue
            if (rest := tail(sent, str(item.text))) is not None:
                yield chunk({"content": rest})
            yield chunk({}, _finish(item, max_tokens), ttt_rag=_rag_info(item).model_dump())
            if include_usage:
                yield _data({**head, "choices": [], "usage": usage_of(item).model_dump()})
    except Exception as e:  # headers already sent: report in-band like OpenAI does
        log.exception("chat stream failed")
        yield _data({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
    yield "data: [DONE]\n\n"
