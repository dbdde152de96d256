"""LangChain adapters over ``HybridRAG``: a retriever and a chat model (thin shells; the work is in rag.py).

    from hybrid.langchain import HybridRetriever, TTTChatModel
    docs = HybridRetriever(rag=rag, k=4).invoke("Which code opens the vault?")
    msg = TTTChatModel(rag=rag, route="auto").invoke("What is the story about?")

Needs ``pip install 'ttt-rag[langchain]'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

try:
    from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.retrievers import BaseRetriever
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"hybrid.langchain needs langchain-core: pip install 'ttt-rag[langchain]' ({e})") from e

from pydantic import ConfigDict, Field

__all__ = ["HybridRetriever", "TTTChatModel"]


class HybridRetriever(BaseRetriever):
    """Top-k chunks of a ``HybridRAG`` store as ``Document``s (scores and route in the metadata)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    rag: Any  # hybrid.HybridRAG
    k: int = Field(default=4, ge=1)
    mode: str | None = None  # "hybrid" | "bm25" | "dense"; None = the rag's configured search mode

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        sources = self.rag.search(query, k=self.k if k is None else k, mode=self.mode)
        return [
            Document(
                id=s.chunk_id,
                page_content=s.text,
                metadata={
                    "doc_id": s.doc_id,
                    "chunk_id": s.chunk_id,
                    "start": s.start,
                    "end": s.end,
                    "score": s.score,
                    "scores": dict(s.scores),
                    "route": "lookup",
                },
            )
            for s in sources
        ]


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = [b if isinstance(b, str) else b.get("text", "") for b in content if isinstance(b, str | dict)]
    return "".join(parts)


class TTTChatModel(BaseChatModel):
    """Chat model answering the last user message via ``HybridRAG.answer`` (route, sources in metadata)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    rag: Any  # hybrid.HybridRAG
    model: str = "ttt-rag"  # reported as ls_model_name
    route: str = "auto"  # "auto" | "comprehension" | "lookup" | "fused"
    top_k: int | None = None
    max_tokens: int | None = None  # None = the rag's max_new_tokens
    temperature: float = 0.0
    stop: list[str] | None = None

    @property
    def _llm_type(self) -> str:
        return "ttt-rag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "route": self.route,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def _question(self, messages: list[BaseMessage]) -> str:
        humans = [m for m in messages if isinstance(m, HumanMessage)]
        return _text(humans[-1] if humans else messages[-1])

    def _kwargs(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "route": kwargs.get("route", self.route),
            "top_k": kwargs.get("top_k", self.top_k),
            "max_new_tokens": kwargs.get("max_tokens", self.max_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "stop": stop if stop is not None else self.stop,
            "answer_start": kwargs.get("answer_start", ""),  # per call: text the reply continues
        }

    def _metadata(self, ans: Any) -> tuple[dict[str, Any], UsageMetadata]:
        d = ans.to_dict()
        meta = {
            "model_name": self.model,
            "route": ans.route,
            "decision": d["decision"],
            "sources": d["sources"],
            "timings": d["timings"],
            "memory_rebuilt": ans.memory_rebuilt,
        }
        u = ans.usage
        usage = UsageMetadata(
            input_tokens=u["prompt_tokens"],
            output_tokens=u["completion_tokens"],
            total_tokens=u["total_tokens"],
        )
        return meta, usage

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        ans = self.rag.answer(self._question(messages), **self._kwargs(stop, kwargs))
        meta, usage = self._metadata(ans)
        msg = AIMessage(content=ans.text, response_metadata=meta, usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for item in self.rag.answer_stream(self._question(messages), **self._kwargs(stop, kwargs)):
            if isinstance(item, str):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
                if run_manager is not None:
                    run_manager.on_llm_new_token(item, chunk=chunk)
                yield chunk
            else:  # the final Answer: metadata + usage on the last chunk
                meta, usage = self._metadata(item)
                yield ChatGenerationChunk(
                    message=AIMessageChunk(
                        content="", response_metadata=meta, usage_metadata=usage, chunk_position="last"
                    )
                )
