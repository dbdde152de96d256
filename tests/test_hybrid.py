"""HybridRAG end to end on a tiny random debug model + a BM25-only index (CPU, a few seconds each).

Run: .venv/bin/python -m pytest -q tests/test_hybrid.py
With a random model the generated text is noise, so the tests check what a bug would break: which chunk is
retrieved and cited, which route runs, that the corpus memory equals a one-shot ``prefill`` of the same joined
tokens, that stale memories are rebuilt, that requests do not leak into each other, and the errors.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from hybrid import (
    CorruptMemoryError,
    EmptyQuestionError,
    InvalidDocumentsError,
    InvalidQuestionError,
    NotIngestedError,
    QuestionTooLongError,
    UnknownRouteError,
)
from hybrid.rag import HybridConfig, HybridRAG, random_debug_model

DOCS = [
    ("harbour", "The harbour master keeps a ledger of every ship. Ships arrive at dawn and leave at dusk."),
    ("vault", "The vault under the old mill opens with the code 7731. Only the miller knows the code."),
    ("garden", "The walled garden grows pears and quinces. A gardener waters the pears every morning."),
    ("orchard", "Apple trees line the orchard road. The orchard keeper sells cider at the autumn fair."),
]


def greedy_reference(model, prompt_ids, eos_id, adjust, steps=6) -> list[int]:
    """Greedy decoding with the plain forward recomputed from scratch every step (no cache, no TTT state);
    ``adjust(logits, out)`` returns the logits to choose from given the tokens chosen so far."""
    ids, out = torch.tensor([prompt_ids]), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(adjust(model(ids)[0, -1], out).argmax())
            if nxt == eos_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def keep_only(logits, ok: set[int]):
    """``logits`` with every token outside ``ok`` set to -inf."""
    logits[[t for t in range(logits.shape[0]) if t not in ok]] = float("-inf")
    return logits


@pytest.fixture(scope="module")
def tok():
    from ttt.tokenizer import Tokenizer

    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def model():
    # window 320 > prompt + answer, so the reader's prompt is attended in full; b = 16 tokens per TTT step
    return random_debug_model(seed=0, window=320, ttt_chunk=16)


def make_rag(store: Path, model, tok, **cfg) -> HybridRAG:
    from retrieval import Index

    index = Index.open(store) if (store / "manifest.json").exists() else Index.create(store, dense=False)
    config = HybridConfig(search_mode="bm25", max_new_tokens=6, top_k=3, read_block_tokens=64, **cfg)
    return HybridRAG(model, tok, index, config=config)


def joined(tok, docs) -> list[int]:
    ids: list[int] = []
    for _, text in docs:
        ids += tok.encode(text) + [tok.sep_id]
    return ids


def assert_state_equal(a, b) -> None:
    assert a.pos == b.pos, f"pos {a.pos} != {b.pos}"
    assert a.fast.keys() == b.fast.keys()
    for k in a.fast:
        torch.testing.assert_close(a.fast[k], b.fast[k], rtol=1e-4, atol=1e-5, msg=f"fast weight {k}")
    for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True):
        torch.testing.assert_close(ka, kb, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.pending_tokens, b.pending_tokens)


def test_lookup_cites_the_planted_fact(tmp_path, model, tok):
    rag = make_rag(tmp_path, model, tok)
    rag.ingest(DOCS)
    ans = rag.answer("Which code opens the vault under the old mill?", route="lookup")
    assert ans.route == "lookup" and ans.decision.route == "lookup"
    assert ans.sources[0].doc_id == "vault", [s.doc_id for s in ans.sources]
    assert "7731" in ans.sources[0].text
    assert ans.sources[0].marker >= 1, "the planted chunk must be in the reader's prompt"
    assert ans.memory_version is None and ans.usage["prompt_tokens"] <= model.cfg.window - 6


@pytest.mark.parametrize(
    "mode", ["free", "extractive", "extractive-top1", "contrast", "free-start", "extractive-start"]
)
def test_reader_decodes_with_base_weights(tmp_path, model, tok, mode):
    """The lookup answer equals greedy decoding with the plain forward (W0, no TTT) over the same prompt;
    extractive: digit words only as verbatim copies from the prompt's sources (brute force here; -top1: from
    the top-ranked source only); contrast:
    argmax of 1.5 * logits - 0.5 * logits of the prompt without its sources (both recomputed from scratch);
    -start: the answer begins with given text (the prompt ends with it, the rule reads it as written)."""
    from copy_reference import allowed

    from hybrid.extractive import token_texts
    from hybrid.reader import ReaderConfig, build_prompt, token_budget

    rag = make_rag(tmp_path, model, tok)
    extractive = mode.startswith("extractive")
    top = 1 if mode == "extractive-top1" else None
    rag.config.reader = ReaderConfig(
        extractive=extractive, extractive_sources=top, context_contrast=0.5 if mode == "contrast" else 0.0
    )
    rag.ingest(DOCS)
    q = "Who waters the pears?"
    start = " The one who waters the pears is" if mode.endswith("-start") else ""
    ans = rag.answer(q, route="lookup", answer_start=start)
    hits = rag.index.search(q, k=3, mode="bm25")
    budget = token_budget(model.cfg.window, 6, rag.config.reader)
    prompt = build_prompt(q, hits, tok, budget=budget, answer_start=start)
    assert tok.decode(prompt.ids).endswith("\nAnswer:" + start)
    body = prompt.ids[prompt.body[0] : prompt.body[1]]
    assert tok.decode(body).startswith("[1] ") and q not in tok.decode(body)
    texts = token_texts(tok, model.cfg.vocab_size)
    source = tok.decode(body) if top is None else prompt.sources[0].text
    bare = build_prompt(q, [], tok, budget=token_budget(model.cfg.window, 6, rag.config.reader)).ids

    def adjust(logits, out):
        if mode == "contrast":
            logits = 1.5 * logits - 0.5 * model(torch.tensor([bare + out]))[0, -1]
        if extractive:
            logits = keep_only(logits, allowed(start + tok.decode(out), source, texts, tok.eos_id))
        return logits

    out = greedy_reference(model, prompt.ids, tok.eos_id, adjust)
    assert ans.text == tok.decode(out)
    assert ans.usage["completion_tokens"] == len(out)


def test_auto_routes_lookup_and_summary(tmp_path, model, tok):
    pytest.importorskip(
        "sentence_transformers", reason="the shipped router needs pip install 'ttt-rag[retrieval]'"
    )
    rag = make_rag(tmp_path, model, tok)
    rag.ingest(DOCS)
    look = rag.answer('What is the exact code "7731" used for?', route="auto")
    summ = rag.answer("Summarize the main themes of these stories in a few sentences.", route="auto")
    assert look.route == "lookup", look.decision
    assert summ.route == "comprehension", summ.decision
    assert 0.0 <= look.decision.confidence <= 1.0 and look.decision.reason


def test_incremental_ingest_equals_one_shot_prefill(tmp_path, model, tok):
    rag = make_rag(tmp_path, model, tok)
    r1 = rag.ingest(DOCS[:2])
    r2 = rag.ingest(DOCS[2:])
    ids = joined(tok, DOCS)
    assert r1.tokens_read + r2.tokens_read == len(ids)
    assert not r2.memory_rebuilt and r2.version == r1.version + 1
    state, meta = rag.memory.load()
    assert meta.doc_ids == [d for d, _ in DOCS] and meta.tokens_read == len(ids)
    with torch.no_grad():
        ref = model.prefill(torch.tensor([ids])).state
    assert_state_equal(state, ref)
    # re-ingesting an unchanged document reads nothing; a changed one forces a full re-read
    assert rag.ingest([DOCS[0]]).tokens_read == 0
    changed = ("vault", "The vault code was changed to 9090 last winter.")
    rep = rag.ingest([changed])
    assert rep.memory_rebuilt
    state, _ = rag.memory.load()
    with torch.no_grad():
        ref = model.prefill(torch.tensor([joined(tok, [DOCS[0], DOCS[2], DOCS[3], changed])])).state
    assert_state_equal(state, ref)


def test_delete_marks_memory_stale_and_rebuilds(tmp_path, model, tok):
    rag = make_rag(tmp_path, model, tok)
    rag.ingest(DOCS)
    assert rag.delete(["vault", "no-such-doc"]) == 1
    assert rag.memory.head().stale
    assert "vault" not in rag.documents()
    lookup = rag.answer("Which code opens the vault?", route="lookup")  # lookup never needs the memory
    assert all(s.doc_id != "vault" for s in lookup.sources) and not lookup.memory_rebuilt
    ans = rag.answer("What grows in the garden?", route="comprehension")
    assert ans.memory_rebuilt and "memory_rebuild" in ans.timings
    assert not rag.memory.head().stale
    state, meta = rag.memory.load()
    rest = [d for d in DOCS if d[0] != "vault"]
    assert meta.doc_ids == [d for d, _ in rest]
    with torch.no_grad():
        ref = model.prefill(torch.tensor([joined(tok, rest)])).state
    assert_state_equal(state, ref)
    again = rag.answer("What grows in the garden?", route="comprehension")
    assert not again.memory_rebuilt and again.text == ans.text


def test_reopen_uses_saved_memory(tmp_path, model, tok):
    rag = make_rag(tmp_path, model, tok)
    rag.ingest(DOCS)
    first = rag.answer("Describe the orchard.", route="fused")
    reopened = make_rag(tmp_path, model, tok)
    second = reopened.answer("Describe the orchard.", route="fused")
    assert not second.memory_rebuilt and second.memory_version == first.memory_version
    assert second.text == first.text and [s.chunk_id for s in second.sources] == [
        s.chunk_id for s in first.sources
    ]


def test_concurrent_answers_match_sequential(tmp_path, model, tok):
    rag = make_rag(tmp_path, model, tok)
    rag.ingest(DOCS)
    meta_before = rag.memory.head()
    jobs = [
        ("What is the harbour master's ledger?", "comprehension"),
        ("Which code opens the vault?", "lookup"),
        ("Who sells cider?", "fused"),
        ("Tell me about the pears.", "comprehension"),
    ]
    seq = [rag.answer(q, route=r) for q, r in jobs]
    got: dict[int, object] = {}

    def run(i: int) -> None:
        got[i] = rag.answer(*jobs[i][:1], route=jobs[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(seq):
        assert got[i].text == ref.text and got[i].route == ref.route
        assert [s.chunk_id for s in got[i].sources] == [s.chunk_id for s in ref.sources]
    assert rag.memory.head().sha256 == meta_before.sha256, "answers must not change the stored memory"


def test_stream_pieces_join_to_the_answer(tmp_path, model, tok):
    rag = make_rag(tmp_path, model, tok)
    rag.ingest(DOCS)
    items = list(rag.answer_stream("Who keeps the ledger?", route="comprehension"))
    final = items[-1]
    assert "".join(items[:-1]) == final.text
    assert final.text == rag.answer("Who keeps the ledger?", route="comprehension").text


def test_bad_input_errors(tmp_path, model, tok):
    rag = make_rag(tmp_path, model, tok)
    with pytest.raises(NotIngestedError):
        rag.answer("anything?", route="lookup")
    with pytest.raises(InvalidDocumentsError):
        rag.ingest([("a", "x"), ("a", "y")])
    with pytest.raises(InvalidDocumentsError):
        rag.ingest([("a", "   ")])
    with pytest.raises(InvalidDocumentsError):
        rag.delete("a")
    assert rag.documents() == [], "failed ingests must store nothing"
    rag.ingest(DOCS)
    with pytest.raises(EmptyQuestionError):
        rag.answer("   ")
    with pytest.raises(UnknownRouteError, match="comprehension"):
        rag.answer("hi?", route="summarize")
    with pytest.raises(QuestionTooLongError):
        rag.answer("why " * 200, route="lookup")
    with pytest.raises(QuestionTooLongError):
        rag.answer("why " * 200, route="comprehension")
    with pytest.raises(QuestionTooLongError, match="answer start"):
        rag.answer("why?", route="lookup", answer_start=" because" * 200)
    with pytest.raises(InvalidQuestionError, match="answer_start"):
        rag.answer("why?", route="lookup", answer_start=7)  # type: ignore[arg-type]
    assert sorted(rag.documents()) == sorted(d for d, _ in DOCS), "failed answers must not touch the store"


def test_corrupt_memory_is_reported_and_previous_version_loads(tmp_path, model, tok):
    rag = make_rag(tmp_path, model, tok)
    rag.ingest(DOCS[:2])
    v1_state, v1 = rag.memory.load()
    rag.ingest(DOCS[2:])
    v2 = rag.memory.head()
    path = rag.memory.dir / v2.file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    fresh = make_rag(tmp_path, model, tok)  # a new process would see the file on disk
    with pytest.raises(CorruptMemoryError, match=rf"{v2.version}\.safetensors.*sha256"):
        fresh.answer("What is in the garden?", route="comprehension")
    state, meta = fresh.memory.load(v1.version)  # the previous version still loads
    assert_state_equal(state, v1_state)
    fresh.memory.rollback()
    ans = fresh.answer("What is in the garden?", route="comprehension")
    assert ans.memory_rebuilt, "a rolled-back memory lacks later documents: it must be rebuilt"
    _, meta = fresh.memory.load()
    assert meta.doc_ids == [d for d, _ in DOCS]


@pytest.mark.parametrize(
    "q,single",
    [("What is the code of the vault under the mill?", True), ("Which codes open the vault?", False)],
)
def test_value_answers_decode_source_values_only(tmp_path, model, tok, q, single):
    """``value_answers``: a value question's answer equals greedy decoding (plain forward) restricted by the
    brute-force strict rule: values of the top source (a plural noun: of every source), punctuation, and a stop
    only after a complete value."""
    from copy_reference import allowed_strict, digit_words

    from hybrid.extractive import (
        ValueAnswer,
        best_value_sentence,
        relevant_value_units,
        token_texts,
        value_question,
    )
    from hybrid.reader import ReaderConfig, build_prompt, token_budget

    rag = make_rag(tmp_path, model, tok)
    rag.config.reader = ReaderConfig(value_answers=True)
    rag.ingest(DOCS)
    ans = rag.answer(q, route="lookup")
    hits = rag.index.search(q, k=3, mode="bm25")
    prompt = build_prompt(q, hits, tok, budget=token_budget(model.cfg.window, 6, rag.config.reader))
    assert "7731" in prompt.sources[0].text, "the vault chunk must rank first for this check"
    top = best_value_sentence(q, prompt.sources[0].text, rag._similarity)
    units = relevant_value_units(q, "\n".join(s.text for s in prompt.sources), rag._similarity)
    source = top if single else "\n".join(units)
    texts = token_texts(tok, model.cfg.vocab_size)
    out = greedy_reference(
        model,
        prompt.ids,
        tok.eos_id,
        lambda logits, out: keep_only(
            logits, allowed_strict(tok.decode(out), source, texts, tok.eos_id, single, exhaustive=True)
        ),
    )
    assert ans.text == tok.decode(out) and any(ch.isdigit() for ch in ans.text)
    plan = {
        "route": "fused",
        "prompt": prompt,
        "question": q,
        "value_kind": value_question(q),
        "answer_start": "",
    }
    rule = rag._constraint(plan)  # the fused route's sources get the same rule
    assert isinstance(rule, ValueAnswer) and rule.complete == digit_words(source) and rule.single == single
    other = "Who waters the pears?"
    assert rag._constraint(plan | {"question": other, "value_kind": value_question(other)}) is None
    if not rag.index.dense_enabled:  # without an embedder sentences are compared by shared content words
        assert rag._similarity("the vault code", ["The vault code is 1.", "Pears 2."]) == [2.0, 0.0]


@pytest.mark.parametrize("n_top", [None, 1, 2])
def test_copy_rule_reads_the_top_ranked_sources(tmp_path, model, tok, n_top):
    """``extractive_sources=n``: the values a lookup answer may copy are the digit words of the n top-ranked
    sources of its prompt (marker order = rank order); None: of every numbered source."""
    from hybrid.reader import ReaderConfig, build_prompt, token_budget

    rag = make_rag(tmp_path, model, tok)
    rag.config.reader = ReaderConfig(extractive=True, extractive_sources=n_top, value_answers=False)
    rag.ingest(DOCS)
    q = 'What is the exact code "7731" used for?'
    hits = rag.index.search(q, k=3, mode="bm25")
    prompt = build_prompt(q, hits, tok, budget=token_budget(model.cfg.window, 6, rag.config.reader))
    plan = {"route": "lookup", "prompt": prompt, "value_kind": None, "answer_start": ""}  # value answers off
    rule = rag._constraint(plan)
    if n_top is None:  # the numbered body, markers included (a citation "[1]" is copyable)
        text = tok.decode(prompt.ids[prompt.body[0] : prompt.body[1]])
    else:
        text = " ".join(s.text for s in prompt.sources[:n_top])
    expect = {w.strip(",.;:!?()[]{}\"'") for w in text.split()}
    assert rule.complete == {w for w in expect if any(ch.isdigit() for ch in w)}
    assert len(prompt.sources) >= 2
    assert rag._constraint(plan | {"route": "comprehension"}) is None


def test_similarity_is_the_index_embedders_cosine(tmp_path, model, tok):
    """With a dense index the value sentence is chosen by cosine: equal to the dot of the embedder's unit
    vectors, computed apart."""
    import numpy as np
    from retrieval_helpers import HashEmbedder

    from retrieval import Index

    emb = HashEmbedder()
    rag = HybridRAG(model, tok, Index.create(tmp_path / "dense", embedder=emb))
    q, texts = "the vault code", ["The vault code is 1.", "Pears 2.", "code 3"]
    v = emb.encode([q, *texts])
    want = [float(np.dot(v[0], x)) for x in v[1:]]
    assert rag._similarity(q, texts) == pytest.approx(want, abs=1e-6) and len(set(want)) > 1


def test_value_question_routed_to_comprehension_reads_sources_too(tmp_path, model, tok):
    """A router that says comprehension: a value question is answered fused (memory + sources, the value rule),
    other questions and a caller's explicit route are left alone; the same with value answers off."""
    from hybrid.reader import ReaderConfig
    from router import RouteDecision

    class Always:
        def route(self, q: str) -> RouteDecision:
            return RouteDecision(route="comprehension", confidence=0.9, reason="stub")

    from retrieval import Index

    config = HybridConfig(search_mode="bm25", max_new_tokens=6, top_k=3, read_block_tokens=64)
    rag = HybridRAG(model, tok, Index.create(tmp_path / "s", dense=False), config=config, router=Always())
    rag.ingest(DOCS)
    ans = rag.answer("What is the code of the vault?")
    assert ans.route == "fused" and "value question" in ans.decision.reason and ans.sources
    assert rag.answer("Who waters the pears?").route == "comprehension"
    assert rag.answer("What is the code of the vault?", route="comprehension").route == "comprehension"
    rag.config.reader = ReaderConfig(value_answers=False)
    assert rag.answer("What is the code of the vault?").route == "comprehension"


def test_a_value_question_keeps_room_for_a_short_answer_only(tmp_path, model, tok):
    """A value question reserves ``value_answer_tokens`` of the window for its answer, not the caller's
    ``max_new_tokens``: its prompt holds more sources, and still ends that many tokens before the window does;
    another question keeps the caller's reserve."""
    from hybrid.reader import ReaderConfig

    rag = make_rag(tmp_path, model, tok)
    rag.ingest(DOCS)
    window, reserve = model.cfg.window, 48
    for q in ("Which codes open the vault under the mill?", "Which code opens the vault under the mill?"):
        rag.config.reader = ReaderConfig(value_answers=True, value_answer_tokens=reserve)
        short = rag._plan(q, "lookup", 4, 200, "")["prompt"]
        rag.config.reader = ReaderConfig(value_answers=False)
        plain = rag._plan(q, "lookup", 4, 200, "")["prompt"]
        assert len(plain.ids) <= window - 200 < len(short.ids) <= window - reserve
        assert len(short.sources) > len(plain.sources)
    rag.config.reader = ReaderConfig(value_answers=True, value_answer_tokens=reserve)
    other = rag._plan("Who waters the pears in the walled garden?", "lookup", 4, 200, "")["prompt"]
    assert len(other.ids) <= window - 200
