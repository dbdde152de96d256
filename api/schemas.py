"""Request and response models of the REST API (pydantic 2). Never the internal HybridRAG objects.

Static bounds here are hard caps that keep the OpenAPI schema honest; the tighter, configurable limits
(question length, ``max_tokens``, ``top_k``) are checked against :class:`api.settings.Settings` in the
handlers and answered with 422 and a message naming the limit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Route = Literal["auto", "comprehension", "lookup", "fused"]
JobStatus = Literal["queued", "running", "done", "failed"]
DOC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
HARD_MAX_CHARS = 1_000_000


# Before OpenAPI 3.2, the `schema` of a text/event-stream reply describes one event.
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}

# ---------------------------------------------------------------- answer


class AnswerRequest(BaseModel):
    """Body of ``POST /v1/answer``."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=HARD_MAX_CHARS)
    route: Route = "auto"
    top_k: int = Field(default=4, ge=1, le=1000)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="default: greedy")
    answer_start: str = Field(
        default="",
        max_length=HARD_MAX_CHARS,
        description="text the answer begins with (e.g. RULER's answer prefix); `answer` is its continuation",
    )
    stream: bool = False


class Decision(BaseModel):
    """The router's decision (or the forced route with confidence 1)."""

    route: str
    confidence: float
    reason: str


class Source(BaseModel):
    """One retrieved chunk that backs an answer."""

    doc_id: str
    chunk_id: str
    text: str
    score: float
    scores: dict[str, float | None] = Field(default_factory=dict)
    start: int = 0  # character offsets of the chunk in its document
    end: int = 0
    cited: bool = False  # the answer cites this source ([n] marker or word overlap)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AnswerResponse(BaseModel):
    """Body of a non-streaming ``POST /v1/answer`` reply."""

    request_id: str
    answer: str
    route: str
    decision: Decision
    sources: list[Source]
    timings: dict[str, float]
    usage: Usage


# ---------------------------------------------------------------- OpenAI-compatible chat


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions body we honour; unknown OpenAI fields are ignored.

    ``route`` and ``top_k`` are our extensions (send them with the SDK's ``extra_body``).
    """

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = Field(default=None, description="up to 4 stop strings")
    route: Route = "auto"
    top_k: int = Field(default=4, ge=1, le=1000)


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]


class RagInfo(BaseModel):
    """Our extension field on chat completions: how the answer was produced."""

    route: str
    decision: Decision
    sources: list[Source]
    timings: dict[str, float]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    ttt_rag: RagInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ttt-rag"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- documents and jobs


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, pattern=DOC_ID_PATTERN, description="default: a content hash")
    text: str = Field(min_length=1, max_length=HARD_MAX_CHARS * 64)
    metadata: dict[str, Any] | None = None


class DocumentsRequest(BaseModel):
    """Body of ``POST /v1/documents`` (JSON form; multipart ``files`` is the other form)."""

    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(min_length=1, max_length=100_000)


class JobAccepted(BaseModel):
    job_id: str
    document_ids: list[str]
    status: JobStatus


class Job(BaseModel):
    """An ingest job. ``done`` = every document in it is stored (acknowledged)."""

    job_id: str
    status: JobStatus
    document_ids: list[str]
    created: float
    updated: float
    attempts: int = 0
    error: str | None = None
    result: dict[str, Any] | None = None


class DocumentList(BaseModel):
    documents: list[str]
    count: int


class Deleted(BaseModel):
    id: str
    deleted: bool = True


class Health(BaseModel):
    status: str
    detail: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """Every error reply: a message, or (request validation) FastAPI's list of field errors."""

    detail: str | list[dict[str, Any]]
