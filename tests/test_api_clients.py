"""The server on a real loopback socket (uvicorn, 127.0.0.1, free port) talking to the official
``openai`` client and LangChain's ``ChatOpenAI``; the REAL HybridRAG (tiny random model) answers.

Run: .venv/bin/python -m pytest -q tests/test_api_clients.py
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from test_api_support import API_KEY, AUTH, LoopbackServer, make_rag, settings_for, wait_job

Q = "What is the harbor lighthouse code?"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    store = tmp_path_factory.mktemp("store")
    rag = make_rag(store)
    with LoopbackServer(settings_for(store), rag) as srv:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            docs = [{"id": "lighthouse", "text": "The harbor lighthouse code is 7731. Keepers climb at night."},
                    {"id": "orchard", "text": "Apples and pears grow in the orchard."}]  # fmt: skip
            job = http.post("/v1/documents", json={"documents": docs}, headers=AUTH).json()["job_id"]
            assert wait_job(http.get, job)["status"] == "done"
        yield srv, rag


def reference(rag: Any) -> Any:
    return rag.answer(Q, route="lookup", max_new_tokens=6)


def test_openai_client_chat_and_models(server: Any) -> None:
    import openai

    srv, rag = server
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["ttt-rag"]
    out = client.chat.completions.create(
        model="ttt-rag",
        messages=[{"role": "user", "content": Q}],
        max_tokens=6,
        extra_body={"route": "lookup"},
    )
    ref = reference(rag)
    assert out.choices[0].message.content == ref.text
    assert out.usage.completion_tokens == ref.usage["completion_tokens"]
    extra = out.model_extra["ttt_rag"]
    assert extra["route"] == "lookup" and extra["sources"][0]["doc_id"] == "lighthouse"


def test_openai_client_streaming(server: Any) -> None:
    import openai

    srv, rag = server
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="ttt-rag", messages=[{"role": "user", "content": Q}], max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"route": "lookup"},
    )  # fmt: skip
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    ref = reference(rag)
    assert "".join(pieces) == ref.text
    assert finish in ("stop", "length") and usage.completion_tokens == ref.usage["completion_tokens"]


def test_openai_client_errors(server: Any) -> None:
    import openai

    srv, _ = server
    bad = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError):
        good.chat.completions.create(
            model="ttt-rag", messages=[{"role": "user", "content": "hi"}], max_tokens=999
        )


def test_langchain_chat_openai(server: Any) -> None:
    from langchain_openai import ChatOpenAI

    srv, rag = server
    llm = ChatOpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY, model="ttt-rag", max_tokens=6,
                     temperature=0, max_retries=0, extra_body={"route": "lookup"})  # fmt: skip
    ref = reference(rag)
    msg = llm.invoke(Q)
    assert msg.content == ref.text
    assert "".join(str(c.content) for c in llm.stream(Q)) == ref.text
