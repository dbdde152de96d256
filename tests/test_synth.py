"""Synthetic reading documents, kind "kv" (key-value lookup): clean of evaluation material, answers correct.

Run: .venv/bin/python -m pytest -q tests/test_synth.py
"""

from __future__ import annotations

import random
import re
from collections import Counter
from types import SimpleNamespace

import pytest
from conftest import shared_path
from test_data import fake_book

from ttt.synth import (
    ATTRIBUTES,
    MULTI_STATEMENTS,
    SOURCES_HEADER,
    STATEMENTS,
    SynthConfig,
    book_vocabulary,
    kv_example,
    sources_prompt,
    synth_documents,
)
from ttt.tokenizer import Tokenizer

# The brief's list of RULER / NIAH phrases, written out here independently of ttt.synth.BANNED.
EVAL_PHRASES = (
    "special magic",
    "magic number",
    "mentioned in the provided text",
    "make sure to memorize",
    "i will quiz you",
    "hidden within the following text",
)
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
KV = SynthConfig(share=0.5, kinds=("kv",))


@pytest.fixture(scope="module")
def book() -> str:
    return fake_book(random.Random(5), 400)


def _examples(book: str, n: int, seed: int = 0) -> list:
    paragraphs = [p for p in book.split("\n\n") if p.strip()]
    vocab, rng = book_vocabulary(book), random.Random(seed)
    out = [kv_example(paragraphs, vocab, rng, KV) for _ in range(n)]
    return [e for e in out if e is not None]


def _values_stated(prompt: str, key: str, attr: str) -> list[str]:
    """Every value any statement template gives for (key, attr) in ``prompt``: an independent parse."""
    found = []
    for t in STATEMENTS + MULTI_STATEMENTS:
        head, tail = t.format(key=key, attr=attr, attrs=attr + "s", value="\0").split("\0")
        value = rf"(\d{{5,9}}|{UUID})" if head == "" else r"([0-9a-z -]+?)"  # word values never lead
        pat = re.escape(head) + value + re.escape(tail)
        for m in re.finditer(pat, prompt, flags=re.IGNORECASE if head[:1].isalpha() else 0):
            found.append((m.start(), m.group(1)))
    return [v for _, v in sorted(found)]


def test_no_evaluation_phrases_in_thousands_of_docs(book: str) -> None:
    cfg = SynthConfig(share=0.9, seed=1, kinds=("kv", "copy", "continue", "number"), weights=(4, 1, 1, 1))
    docs = synth_documents(book, "A/B.txt", cfg) + [e.text for e in _examples(book, 2500, seed=2)]
    assert len(docs) > 2500, f"only {len(docs)} docs generated"
    for d in docs:
        low = d.lower()
        assert not [p for p in EVAL_PHRASES if p in low], d[-300:]
    assert sum("\nAnswer: " in d for d in docs) == len(docs)


def test_no_essay_text_and_no_phrases_on_a_real_book() -> None:
    """A real training book (its own names and words as keys) against the NIAH essays' 8-word shingles."""
    from ttt.data import iter_books

    tar = shared_path("data", "corpus", "gutenberg-top100-authors.tar.xz")
    essays = shared_path("data", "haystack", "pg_essays")
    real = next(iter(iter_books(tar, max_books=1))).text

    def shingles(text: str) -> set[tuple[str, ...]]:
        w = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(w[i : i + 8]) for i in range(len(w) - 7)}

    essay = set().union(*(shingles(p.read_text(errors="replace")) for p in sorted(essays.glob("*.txt"))))
    book_sh = shingles(real)
    exs = _examples(real, 600, seed=3)
    for e in exs:
        low = e.text.lower()
        assert not [p for p in EVAL_PHRASES if p in low]
        new = shingles(e.text) - book_sh  # what the generator wrote (facts, question, answer)
        assert not new & essay, f"essay text in a synthetic doc: {sorted(new & essay)[:2]}"


def test_kv_answers_are_exactly_the_inserted_values(book: str) -> None:
    exs = _examples(book, 300)
    assert len(exs) > 270
    for e in exs:
        context = e.prompt.rsplit("Question: ", 1)[0]
        assert len(e.values) == len(e.facts) == len(e.keys) and e.n_facts >= len(e.values)
        for v, f in zip(e.values, e.facts, strict=True):
            assert v in f and context.count(f) == 1 and context.count(v) == 1, (v, f)
        for k in dict.fromkeys(e.keys):  # independent parse: the values stated for the key = the answer's
            stated = _values_stated(context, k, e.attr)
            assert sorted(stated) == sorted(v for v, kk in zip(e.values, e.keys, strict=True) if kk == k), (
                k,
                e.attr,
                stated,
                e.values,
            )
        pos = [e.answer.find(v) for v in e.values]
        assert min(pos) >= 0 and pos == sorted(pos), "answer lists every value, in the answer's order"
        if e.value_kind == "uuid":
            assert re.findall(UUID, e.answer) == e.values, "no distractor value in the answer"
        if e.value_kind == "number":
            assert re.findall(r"\d{5,9}", e.answer) == e.values
            assert all(5 <= len(v) <= 9 and v[0] != "0" for v in e.values)
        if e.question_kind == "multi_value":
            assert len(set(e.keys)) == 1 and 2 <= len(e.values) <= 4
        if e.question_kind == "multi_key":
            assert len(set(e.keys)) == len(e.keys) in (2, 3)
            assert all(k in e.prompt.rsplit("Question: ", 1)[1] for k in e.keys)


def test_kv_mix_covers_kinds_templates_lengths_and_positions(book: str) -> None:
    real_like = book * 2  # long passages need more text than one fake book paragraph run
    exs = _examples(real_like, 1500, seed=4)
    assert set(Counter(e.question_kind for e in exs)) == {"single", "multi_value", "multi_key"}
    assert set(Counter(e.value_kind for e in exs)) == {"number", "uuid", "words"}
    assert set(Counter(e.fmt for e in exs)) == {"plain", "sources"}
    assert len({e.attr for e in exs}) >= 6 and len(ATTRIBUTES) >= 6
    used = set()
    for e in exs:
        for f in e.facts:
            for i, t in enumerate(STATEMENTS):
                head, tail = t.format(key="\0", attr=e.attr, value="\0").split("\0")[0::2]
                if f.lower().startswith(head.lower()) and f.endswith(tail):
                    used.add(i)
    assert len(used) >= 10, f"only {len(used)} statement templates seen"
    plain = [e for e in exs if e.fmt == "plain"]
    lengths = [len(e.prompt) / KV.chars_per_token for e in plain]
    assert min(lengths) < 250 and max(lengths) > 1400, (min(lengths), max(lengths))
    dist = [(len(e.prompt) - min(e.fact_offsets)) / KV.chars_per_token for e in plain]
    assert sum(d > 600 for d in dist) > 50 and sum(d < 300 for d in dist) > 50, "facts far and near"
    answers = Counter(
        e.answer in (e.values[0], ", ".join(e.values)) or " and " in e.answer[-40:] for e in exs
    )
    assert answers[True] > 100 and any(e.answer.startswith("The ") for e in exs), "bare and sentence answers"


def test_kv_deterministic_for_a_seed(book: str) -> None:
    cfg = SynthConfig(share=0.3, seed=7, kinds=("kv", "number"))
    docs = synth_documents(book, "A/B.txt", cfg)
    assert docs == synth_documents(book, "A/B.txt", cfg)
    assert docs != synth_documents(book, "A/B.txt", SynthConfig(share=0.3, seed=8, kinds=("kv", "number")))
    assert [e.text for e in _examples(book, 50, 3)] == [e.text for e in _examples(book, 50, 3)]
    with pytest.raises(ValueError, match="weights"):
        SynthConfig(kinds=("kv", "copy"), weights=(1.0,))
    with pytest.raises(ValueError, match="share"):
        SynthConfig(share=1.0)


def test_sources_layout_is_the_hybrid_readers_prompt() -> None:
    """sources_prompt == the text of hybrid.reader.build_prompt with the same chunks in rank order."""
    from hybrid.reader import ReaderConfig, build_prompt

    assert SOURCES_HEADER == ReaderConfig().header
    tok = Tokenizer.byte_level()
    chunks = ["First chunk. It has two sentences.", "Second chunk with a code 1234567.", "Third one."]
    hits = [
        SimpleNamespace(chunk=SimpleNamespace(text=c, id=str(i), doc_id="d", start=0, end=1), score=1.0)
        for i, c in enumerate(chunks)
    ]
    p = build_prompt("What is the code?", hits, tok, budget=10_000)
    assert tok.decode(p.ids) == sources_prompt(chunks, "What is the code?")


def test_default_config_reproduces_the_pretraining_stream() -> None:
    """The shipped models' synthetic docs (ttt/synth.py before kind "kv", commit b781f3f), pinned by hash."""
    import hashlib
    import json

    docs = synth_documents(fake_book(random.Random(11), 300), "A/B.txt", SynthConfig(share=0.2))
    digest = hashlib.sha256(json.dumps(docs).encode()).hexdigest()
    assert len(docs) == 11 and digest == "e90e2203ec76d0607db4959b9f83c7d9112b93c100f773047e302ecc6097c402"


def test_wide_attributes_only_when_asked_and_never_an_eval_phrase(book: str) -> None:
    """kv_attributes="wide" draws multi-word attribute names too (training); "base" never does (the held-out
    question set); no wide name is a RULER phrase, and wide documents still state the queried values."""
    import dataclasses

    from ttt.synth import WIDE_ATTRIBUTES, is_clean

    assert all(is_clean(f"The {a} of x is 1.") for a in WIDE_ATTRIBUTES)
    assert not set(WIDE_ATTRIBUTES) & set(ATTRIBUTES)
    real_like = book * 2
    paragraphs = [p for p in real_like.split("\n\n") if p.strip()]
    vocab = book_vocabulary(real_like)
    for kind, want_wide in (("base", False), ("wide", True)):
        cfg, rng = dataclasses.replace(KV, kv_attributes=kind), random.Random(7)
        exs = [e for e in (kv_example(paragraphs, vocab, rng, cfg) for _ in range(400)) if e is not None]
        wide = [e for e in exs if e.attr in WIDE_ATTRIBUTES]
        assert bool(wide) == want_wide, (kind, len(wide))
        for e in wide[:50]:
            assert is_clean(e.prompt) and all(v in e.prompt for v in e.values)
    with pytest.raises(ValueError, match="kv_attributes"):
        dataclasses.replace(KV, kv_attributes="all")
