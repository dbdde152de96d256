"""TestClient tests of every REST endpoint and every error branch, against the REAL HybridRAG
(hybrid's seeded random debug model, BM25-only index, rule-only router).

Run: .venv/bin/python -m pytest -q tests/test_api.py
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_api_support import AUTH, make_rag, settings_for, wait_job

from api.main import create_app

PLANTED = "The secret launch code of the harbor lighthouse is 7731."
DOCS = [
    {"id": "lighthouse", "text": PLANTED + " Keepers climb the copper stairs every night."},
    {"id": "orchard", "text": "The orchard grows apples and pears. Bees visit the blossoms in spring."},
    {"id": "glacier", "text": "A glacier moves slowly down the valley, carving the rock beneath it."},
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    store = tmp_path_factory.mktemp("store")
    rag = make_rag(store)
    app = create_app(settings_for(store), rag)
    with TestClient(app) as client:
        r = client.post("/v1/documents", json={"documents": DOCS}, headers=AUTH)
        assert r.status_code == 202, r.text
        assert wait_job(client.get, r.json()["job_id"])["status"] == "done"
        yield client, rag, app.state.service


def ask(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/answer", json={"max_tokens": 4, **body}, headers=AUTH)


def sse_events(text: str) -> list[tuple[str, Any]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines.get("event", "message"), lines["data"]))
    return out


# ---------------------------------------------------------------- health, readiness, metrics


def test_health_and_ready_are_open(env: Any) -> None:
    client, _, _ = env
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["detail"]["model_loaded"] is True


def test_readyz_and_answer_503_before_startup(tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path), rag=object())  # lifespan not run: nothing loaded
    client = TestClient(app)
    assert client.get("/readyz").status_code == 503
    r = client.post("/v1/answer", json={"question": "hi"}, headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_metrics_report_requests_latency_queue_and_memory_version(env: Any) -> None:
    client, rag, _ = env
    ask(client, question="Where is the lighthouse?", route="lookup")
    text = client.get("/metrics").text
    samples = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and ln[0] != "#"}
    assert samples['ttt_rag_requests_total{method="POST",route="/v1/answer",status="200"}'] >= 1
    assert samples['ttt_rag_request_latency_seconds_count{route="/v1/answer"}'] >= 1
    assert "ttt_rag_worker_queue_depth" in samples and "ttt_rag_ingest_queue_depth" in samples
    assert samples["ttt_rag_memory_version"] == rag.memory.head().version >= 1


# ---------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "method,path",
    [("post", "/v1/answer"), ("post", "/v1/chat/completions"), ("get", "/v1/models"),
     ("post", "/v1/documents"), ("get", "/v1/documents"), ("delete", "/v1/documents/x"),
     ("get", "/v1/jobs/0123")],
)  # fmt: skip
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}]
)
def test_protected_endpoints_401(env: Any, method: str, path: str, headers: dict[str, str]) -> None:
    client, _, _ = env
    r = client.request(method.upper(), path, headers=headers, json={})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"


def test_auth_off_without_keys(tmp_path: Path, env: Any) -> None:
    _, rag, _ = env
    with TestClient(create_app(settings_for(tmp_path, api_keys=""), rag)) as client:
        assert client.get("/v1/models").status_code == 200


# ---------------------------------------------------------------- answer


def test_answer_lookup_cites_planted_chunk_and_matches_library(env: Any) -> None:
    client, rag, _ = env
    q = "What is the secret launch code of the harbor lighthouse?"
    r = ask(client, question=q, route="lookup", top_k=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["route"] == "lookup" and body["decision"]["route"] == "lookup"
    assert body["sources"][0]["doc_id"] == "lighthouse" and PLANTED in body["sources"][0]["text"]
    ref = rag.answer(q, route="lookup", top_k=2, max_new_tokens=4)  # the library, called directly
    assert body["answer"] == ref.text
    assert [s["chunk_id"] for s in body["sources"]] == [s.chunk_id for s in ref.sources]
    u = body["usage"]
    assert (
        u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 0 <= u["completion_tokens"] <= 4
    )


def test_answer_start_is_continued_as_the_library_does(env: Any) -> None:
    """``answer_start`` reaches the reader: the reply is the library's continuation of that text, which
    differs from the answer without it (the prompt ends with the start)."""
    client, rag, _ = env
    q, start = "What is the secret launch code of the harbor lighthouse?", " The secret launch code is"
    body = ask(client, question=q, route="lookup", top_k=2, answer_start=start).json()
    ref = rag.answer(q, route="lookup", top_k=2, max_new_tokens=4, answer_start=start)
    plain = rag.answer(q, route="lookup", top_k=2, max_new_tokens=4)
    assert body["answer"] == ref.text
    assert body["usage"]["prompt_tokens"] == ref.usage["prompt_tokens"] > plain.usage["prompt_tokens"]


def test_answer_auto_uses_router_decision(env: Any) -> None:
    client, _, _ = env
    body = ask(client, question="Summarize the overall theme of the corpus").json()
    assert body["route"] == "comprehension" and "rule" in body["decision"]["reason"]
    assert body["sources"] == []
    body = ask(client, question="What code does the lighthouse have?").json()
    assert body["route"] == "lookup" and body["decision"]["confidence"] == 1.0


def test_answer_stream_matches_non_stream(env: Any) -> None:
    client, _, _ = env
    q = {"question": "What is the code of the lighthouse?", "route": "fused", "top_k": 2}
    plain = ask(client, **q).json()
    r = ask(client, **q, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1][0] == "done"
    tokens = "".join(json.loads(d)["text"] for e, d in events if e == "token")
    done = json.loads(events[-1][1])
    assert tokens == done["answer"] == plain["answer"]
    assert done["sources"] == plain["sources"]


@pytest.mark.parametrize(
    "body,needle",
    [({"question": ""}, "question"), ({"question": "   "}, "empty"), ({"question": "x" * 201}, "TTT_RAG_MAX_QUESTION_CHARS"),
     ({"question": "q", "max_tokens": 17}, "TTT_RAG_MAX_TOKENS_LIMIT"), ({"question": "q", "max_tokens": 0}, "max_tokens"),
     ({"question": "q", "top_k": 51}, "TTT_RAG_MAX_TOP_K"), ({"question": "q", "route": "psychic"}, "route"),
     ({"question": "q", "bogus": 1}, "bogus"), ({}, "question"),
     ({"question": "q" * 150, "answer_start": "a" * 51}, "question and answer_start have 201"),
     ({"question": "q", "answer_start": 3}, "answer_start")],
)  # fmt: skip
def test_answer_422(env: Any, body: dict[str, Any], needle: str) -> None:
    client, _, _ = env
    r = client.post("/v1/answer", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert needle in r.text


def test_answer_409_before_any_ingest(tmp_path: Path, env: Any) -> None:
    _, rag, _ = env
    empty = make_rag(tmp_path / "store", model=rag.model)
    with TestClient(create_app(settings_for(tmp_path / "store"), empty)) as client:
        r = ask(client, question="anything?", route="lookup")
        assert r.status_code == 409 and "/v1/documents" in r.json()["detail"]


def test_413_body_too_large(env: Any) -> None:
    client, _, svc = env
    big = {"question": "x" * (svc.settings.max_body_bytes + 10)}
    r = client.post("/v1/answer", json=big, headers=AUTH)
    assert r.status_code == 413 and "TTT_RAG_MAX_BODY_BYTES" in r.json()["detail"]

    def chunked():  # no Content-Length: the limit must hold while streaming the body too
        yield b'{"documents": [{"text": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}]}'

    r = client.post("/v1/documents", content=chunked(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413


def test_503_when_workers_saturated(env: Any) -> None:
    client, _, svc = env
    gate = threading.Event()
    held = [svc.pool.submit(gate.wait) for _ in range(svc.pool.capacity)]
    try:
        for body in (
            {"question": "hi", "route": "lookup"},
            {"question": "hi", "route": "lookup", "stream": True},
        ):
            r = client.post("/v1/answer", json=body, headers=AUTH)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        chat = {"model": "ttt-rag", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=chat, headers=AUTH).status_code == 503
        assert client.delete("/v1/documents/orchard", headers=AUTH).status_code == 503
    finally:
        gate.set()
        for f in held:
            f.result(5)
    assert "orchard" in client.get("/v1/documents", headers=AUTH).json()["documents"]


def test_503_when_ingest_queue_full(env: Any) -> None:
    client, _, svc = env
    worker, gate = svc.ingest, threading.Event()
    real = worker._ingest
    worker._ingest = lambda docs: (gate.wait(10), real(docs))[1]
    jobs = []
    try:
        for i in range(worker.max_pending):
            r = client.post(
                "/v1/documents", json={"documents": [{"id": f"q{i}", "text": f"queued {i}"}]}, headers=AUTH
            )
            assert r.status_code == 202
            jobs.append(r.json()["job_id"])
        r = client.post(
            "/v1/documents", json={"documents": [{"id": "over", "text": "one too many"}]}, headers=AUTH
        )
        assert r.status_code == 503 and "retry-after" in r.headers
    finally:
        gate.set()
    for j in jobs:
        assert wait_job(client.get, j)["status"] == "done"
    worker._ingest = real
    ids = client.get("/v1/documents", headers=AUTH).json()["documents"]
    assert "over" not in ids and all(f"q{i}" in ids for i in range(len(jobs)))
    for i in range(len(jobs)):
        assert client.delete(f"/v1/documents/q{i}", headers=AUTH).status_code == 200


# ---------------------------------------------------------------- documents and jobs


def test_documents_json_ingest_update_and_delete(env: Any) -> None:
    client, _, _ = env
    new = {"id": "volcano", "text": "The volcano Zarqunel erupted in the year 1312 near the bay."}
    r = client.post("/v1/documents", json={"documents": [new]}, headers=AUTH)
    assert r.status_code == 202 and r.json()["document_ids"] == ["volcano"]
    job = wait_job(client.get, r.json()["job_id"])
    assert job["status"] == "done" and job["result"]["version"] >= 2
    listed = client.get("/v1/documents", headers=AUTH).json()
    assert "volcano" in listed["documents"] and listed["count"] == len(listed["documents"])
    top = ask(client, question="When did Zarqunel erupt?", route="lookup", top_k=1).json()["sources"][0]
    assert top["doc_id"] == "volcano" and "1312" in top["text"]

    upd = {"id": "volcano", "text": "The volcano Zarqunel erupted in the year 1999, ash covered the town."}
    assert (
        wait_job(
            client.get, client.post("/v1/documents", json={"documents": [upd]}, headers=AUTH).json()["job_id"]
        )["status"]
        == "done"
    )
    top = ask(client, question="When did Zarqunel erupt?", route="lookup", top_k=1).json()["sources"][0]
    assert "1999" in top["text"] and "1312" not in top["text"]

    r = client.delete("/v1/documents/volcano", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"id": "volcano", "deleted": True}
    assert "volcano" not in client.get("/v1/documents", headers=AUTH).json()["documents"]
    srcs = ask(client, question="When did Zarqunel erupt?", route="lookup").json()["sources"]
    assert all(s["doc_id"] != "volcano" for s in srcs)
    assert client.delete("/v1/documents/volcano", headers=AUTH).status_code == 404


def test_documents_multipart_files(env: Any) -> None:
    client, _, _ = env
    files = [("files", ("notes.txt", b"Quillfeather ink is brewed from walnut husks.", "text/plain")),
             ("files", ("bad name!.txt", b"Marrowdale bridge has nine arches.", "text/plain"))]  # fmt: skip
    r = client.post("/v1/documents", files=files, headers=AUTH)
    assert r.status_code == 202, r.text
    ids = r.json()["document_ids"]
    assert ids[0] == "notes.txt" and ids[1].startswith("doc-")  # unusable filename -> content hash id
    assert wait_job(client.get, r.json()["job_id"])["status"] == "done"
    top = ask(client, question="How is Quillfeather ink brewed?", route="lookup", top_k=1).json()["sources"][
        0
    ]
    assert top["doc_id"] == "notes.txt"
    for i in ids:
        assert client.delete(f"/v1/documents/{i}", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    "kwargs,code,needle",
    [({"json": {"documents": []}}, 422, "documents"),
     ({"json": {"documents": [{"id": "a", "text": ""}]}}, 422, "text"),
     ({"json": {"documents": [{"id": "a", "text": "  \n "}]}}, 422, "no text"),
     ({"json": {"documents": [{"id": "d", "text": "x"}, {"id": "d", "text": "y"}]}}, 422, "duplicate"),
     ({"json": {"documents": [{"id": "../etc", "text": "x"}]}}, 422, "id"),
     ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "json"),
     ({"files": [("files", ("b.bin", b"\xff\xfe\x00bad", "application/octet-stream"))]}, 422, "UTF-8"),
     ({"data": {"x": "1"}, "files": [("other", ("a.txt", b"hi", "text/plain"))]}, 422, "files"),
     ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "content type")],
)  # fmt: skip
def test_documents_bad_input_changes_nothing(
    env: Any, kwargs: dict[str, Any], code: int, needle: str
) -> None:
    client, _, _ = env
    before = client.get("/v1/documents", headers=AUTH).json()
    headers = {**AUTH, **kwargs.pop("headers", {})}
    r = client.post("/v1/documents", headers=headers, **kwargs)
    assert r.status_code == code, r.text
    assert needle.lower() in r.text.lower()
    assert client.get("/v1/documents", headers=AUTH).json() == before


def test_jobs_404(env: Any) -> None:
    client, _, _ = env
    for jid in ("0" * 32, "not-a-job", "..%2F..%2Fetc"):
        r = client.get(f"/v1/jobs/{jid}", headers=AUTH)
        assert r.status_code == 404, (jid, r.text)


def test_shutdown_finishes_running_job_and_keeps_queued_ones(tmp_path: Path, env: Any) -> None:
    _, rag, _ = env
    store = tmp_path / "store"
    settings = settings_for(store, ingest_queue_size=8)
    with TestClient(create_app(settings, make_rag(store, model=rag.model))) as client:
        ids = []
        for i in range(3):
            r = client.post("/v1/documents", json={"documents": [{"id": f"s{i}", "text": f"shutdown doc {i}"}]},
                            headers=AUTH)  # fmt: skip
            ids.append(r.json()["job_id"])
    # Lifespan ended: nothing may be left half done.
    from api.jobs import JobStore

    statuses = [JobStore(settings.resolved_jobs_dir).get(j)["status"] for j in ids]
    assert set(statuses) <= {"done", "queued"}, statuses
    assert statuses[0] == "done"
    # A restart resumes the queued ones; afterwards every job is done and every document present.
    with TestClient(create_app(settings, make_rag(store, model=rag.model))) as client:
        assert all(wait_job(client.get, j)["status"] == "done" for j in ids)
        docs = client.get("/v1/documents", headers=AUTH).json()["documents"]
    assert {"s0", "s1", "s2"} <= set(docs)


# ---------------------------------------------------------------- OpenAI-compatible chat


def test_models_lists_served_model(env: Any) -> None:
    client, _, _ = env
    body = client.get("/v1/models", headers=AUTH).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["ttt-rag"]


def test_chat_completion_matches_answer(env: Any) -> None:
    client, rag, _ = env
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "What is the lighthouse code?"}]}]  # fmt: skip
    r = client.post("/v1/chat/completions", json={"model": "ttt-rag", "messages": msgs, "max_tokens": 4,
                                                  "route": "lookup"}, headers=AUTH)  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    ref = rag.answer("What is the lighthouse code?", route="lookup", max_new_tokens=4)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == ref.text
    assert body["ttt_rag"]["sources"][0]["doc_id"] == ref.sources[0].doc_id
    assert body["usage"]["completion_tokens"] == ref.usage["completion_tokens"]


def test_chat_stream_chunks_and_done(env: Any) -> None:
    client, _, _ = env
    req = {"model": "ttt-rag", "messages": [{"role": "user", "content": "What is the lighthouse code?"}],
           "max_tokens": 4, "route": "lookup", "stream_options": {"include_usage": True}}  # fmt: skip
    plain = client.post("/v1/chat/completions", json=req, headers=AUTH).json()
    r = client.post("/v1/chat/completions", json={**req, "stream": True}, headers=AUTH)
    lines = [ln for ln in r.text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"] == plain["usage"]


@pytest.mark.parametrize(
    "patch,code",
    [({"model": "gpt-4"}, 404), ({"messages": []}, 422), ({"messages": [{"role": "system", "content": "x"}]}, 422),
     ({"max_tokens": 10_000}, 422), ({"n": 2}, 422), ({"temperature": 5}, 422), ({"stop": ["a"] * 5}, 422),
     ({"messages": [{"role": "wizard", "content": "x"}]}, 422)],
)  # fmt: skip
def test_chat_errors(env: Any, patch: dict[str, Any], code: int) -> None:
    client, _, _ = env
    req = {"model": "ttt-rag", "messages": [{"role": "user", "content": "hi"}], **patch}
    r = client.post("/v1/chat/completions", json=req, headers=AUTH)
    assert r.status_code == code, r.text


def test_x_request_id_header(env: Any) -> None:
    client, _, _ = env
    r = ask(client, question="lighthouse?", route="lookup")
    assert r.headers["x-request-id"] == r.json()["request_id"]
