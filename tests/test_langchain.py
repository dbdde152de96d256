"""LangChain standard suites for ``hybrid.langchain`` (offline: tiny random debug model + BM25-only index).

Run: .venv/bin/python -m pytest -q tests/test_langchain.py
The suites' own ``has_*``/``supports_*`` properties switch off what a local RAG model does not do (tool
calling, structured output, multimodal input); nothing is skipped ad hoc.
"""

from __future__ import annotations

import functools
import tempfile
from typing import Any

import pytest

pytest.importorskip("langchain_tests", reason="needs pip install 'ttt-rag[dev]' (langchain-tests)")

from langchain_core.documents import Document  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

import hybrid.langchain as hlc  # noqa: E402
from hybrid.langchain import HybridRetriever, TTTChatModel  # noqa: E402
from hybrid.rag import HybridConfig, HybridRAG, random_debug_model  # noqa: E402

DOCS = [
    (f"ship-{i}", f"The ship number {i} sails from the harbour at dawn with {i} crates of pears.")
    for i in range(6)
]


@functools.cache
def shared_rag() -> HybridRAG:
    from retrieval import Index
    from ttt.tokenizer import Tokenizer

    store = tempfile.mkdtemp(prefix="ttt-rag-lc-")
    rag = HybridRAG(
        random_debug_model(seed=0, window=256, ttt_chunk=64),
        Tokenizer.byte_level(),
        Index.create(store, dense=False),
        config=HybridConfig(search_mode="bm25", top_k=2, max_new_tokens=8),
    )
    rag.ingest(DOCS)
    return rag


def test_imports():
    assert set(hlc.__all__) == {"HybridRetriever", "TTTChatModel"}


def test_retriever_metadata_matches_search():
    rag = shared_rag()
    docs = HybridRetriever(rag=rag, k=3).invoke("ship number 4 crates")
    hits = rag.index.search("ship number 4 crates", k=3, mode="bm25")
    assert [d.metadata["chunk_id"] for d in docs] == [h.chunk.id for h in hits]
    assert docs[0].metadata["doc_id"] == "ship-4" and docs[0].metadata["score"] == pytest.approx(
        hits[0].score
    )
    assert all(isinstance(d, Document) and d.metadata["route"] == "lookup" for d in docs)


def test_chat_model_reports_route_sources_and_usage():
    msg = TTTChatModel(rag=shared_rag(), route="lookup", max_tokens=5).invoke("Which ship carries 3 crates?")
    meta = msg.response_metadata
    assert meta["route"] == "lookup" and meta["sources"][0]["doc_id"] == "ship-3"
    assert msg.usage_metadata["output_tokens"] <= 5
    assert (
        msg.usage_metadata["total_tokens"]
        == msg.usage_metadata["input_tokens"] + msg.usage_metadata["output_tokens"]
    )


def test_chat_model_passes_answer_start():
    """``invoke(..., answer_start=...)``: the reply is the library's continuation of that text."""
    rag, q, start = shared_rag(), "Which ship carries 3 crates?", " The ship is"
    msg = TTTChatModel(rag=rag, route="lookup", max_tokens=5).invoke(q, answer_start=start)
    ref = rag.answer(q, route="lookup", max_new_tokens=5, answer_start=start)
    plain = rag.answer(q, route="lookup", max_new_tokens=5)
    assert msg.content == ref.text != plain.text  # the start changed the reply (prompts fill the same budget)


def test_chat_model_stop_sequence_truncates():
    full = TTTChatModel(rag=shared_rag(), route="lookup", max_tokens=8).invoke("ship 2").content
    assert len(full) >= 2, "a random model always emits byte tokens here"
    cut = (
        TTTChatModel(rag=shared_rag(), route="lookup", max_tokens=8).invoke("ship 2", stop=[full[1]]).content
    )
    assert cut == full[: full.index(full[1])]
    two = full[1:3]  # a two-character stop string must not leak its first character, streamed or not
    streamed = "".join(
        c.content
        for c in TTTChatModel(rag=shared_rag(), route="lookup", max_tokens=8).stream("ship 2", stop=[two])
    )
    assert streamed == full[: full.index(two)]


# The suites' async tests are plain ``async def``: the class mark runs them with pytest-asyncio whether or not
# the project config sets asyncio_mode=auto (its warning about the suites' sync tests is silenced).
_ASYNC = [pytest.mark.asyncio, pytest.mark.filterwarnings("ignore:.*marked with '@pytest.mark.asyncio'")]


@_ASYNC[0]
@_ASYNC[1]
class TestHybridRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[HybridRetriever]:
        return HybridRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"rag": shared_rag()}

    @property
    def retriever_query_example(self) -> str:
        return "ship harbour pears"


class _ChatParams:
    @property
    def chat_model_class(self) -> type[TTTChatModel]:
        return TTTChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"rag": shared_rag(), "route": "fused", "model": "ttt-rag-debug"}

    @property
    def supports_model_override(self) -> bool:
        return False  # one model per HybridRAG: invoke(model=...) cannot switch it


class TestTTTChatModelUnit(_ChatParams, ChatModelUnitTests):
    pass


@_ASYNC[0]
@_ASYNC[1]
class TestTTTChatModelIntegration(_ChatParams, ChatModelIntegrationTests):
    pass


def test_ingest_accepts_documents_and_plain_texts(tmp_path):
    from retrieval import Index
    from ttt.tokenizer import Tokenizer

    rag = HybridRAG(
        random_debug_model(seed=0, window=256, ttt_chunk=64),
        Tokenizer.byte_level(),
        Index.create(tmp_path, dense=False),
        config=HybridConfig(search_mode="bm25"),
    )
    rep = rag.ingest(
        [Document(page_content="Lanterns hang in the mill.", id="mill"), "Owls nest in the barn."]
    )
    assert rep.doc_ids[0] == "mill" and rep.doc_ids[1].startswith("doc-")
    assert rag.documents() == rep.doc_ids
    assert (
        rep.tokens_read == len("Lanterns hang in the mill.") + len("Owls nest in the barn.") + 2
    )  # bytes + seps
