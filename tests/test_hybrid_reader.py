"""Reader unit tests: prompt packing within the token budget and citation mapping (no model needed).

Run: .venv/bin/python -m pytest -q tests/test_hybrid_reader.py
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hybrid.errors import QuestionTooLongError
from hybrid.reader import ReaderConfig, Source, build_prompt, cite, token_budget


@dataclass
class _Chunk:
    id: str
    doc_id: str
    text: str
    start: int = 0
    end: int = 0


@dataclass
class _Hit:
    chunk: _Chunk
    score: float
    scores: dict


class CharTok:
    """One token per character (ids = code points + 1, 0 = BOS): exact, independent token counts."""

    bos_id = 0

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [ord(c) + 1 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i - 1) for i in ids if i != 0)


def hits(*texts: str) -> list[_Hit]:
    return [_Hit(_Chunk(f"c{i}", f"d{i}", t), 10.0 - i, {"bm25": 10.0 - i}) for i, t in enumerate(texts)]


def test_prompt_layout_is_exact():
    cfg = ReaderConfig()
    p = build_prompt("Who?", hits("alpha", "beta"), CharTok(), budget=1000, cfg=cfg)
    expect = cfg.header + "[1] alpha\n[2] beta\n" + cfg.question_prefix + "Who?" + cfg.answer_prefix
    assert p.ids[0] == 0 and CharTok().decode(p.ids) == expect
    assert [s.marker for s in p.sources] == [1, 2] and p.dropped == 0 and not p.truncated


def test_budget_cuts_lowest_ranked_first():
    cfg = ReaderConfig(min_chunk_tokens=3)
    tok = CharTok()
    fixed = 1 + len(cfg.header) + len(cfg.question_prefix + "Q") + len(cfg.answer_prefix)
    first = "[1] " + "a" * 20 + "\n"
    # room for chunk 1 in full + 5 characters of chunk 2 ("bbb b"), cut back to whole words; chunk 3 dropped
    budget = fixed + len(first) + len("[2] ") + 5 + 1
    p = build_prompt("Q", hits("a" * 20, "bbb " + "b" * 16, "c" * 20), tok, budget=budget, cfg=cfg)
    assert len(p.ids) == budget - 2
    assert [s.text for s in p.sources] == ["a" * 20, "bbb"] and p.truncated and p.dropped == 1
    # too little room for a useful piece of chunk 2: it is dropped, not cut to 2 characters
    p = build_prompt("Q", hits("a" * 20, "b" * 20), tok, budget=budget - 3, cfg=cfg)
    assert [s.text for s in p.sources] == ["a" * 20] and p.dropped == 1


def test_a_cut_source_ends_in_a_whole_word():
    """A value cut by the budget would read as a wrong value ("1544" of "1544803"): at every budget each source
    shown is its chunk, or a prefix of it that ends where a word does; a chunk of one long word is dropped."""
    cfg, tok = ReaderConfig(min_chunk_tokens=3), CharTok()
    texts = ("The vault code is 1544803 and the uuid c7ace3de-31c3-4761 opens it.", "x" * 30, "ab cd ef gh")
    fixed = 1 + len(cfg.header) + len(cfg.question_prefix + "Q") + len(cfg.answer_prefix)
    seen = set()
    for budget in range(fixed, fixed + 130):
        p = build_prompt("Q", hits(*texts), tok, budget=budget, cfg=cfg)
        assert len(p.ids) <= budget
        for src, chunk in zip(p.sources, texts, strict=False):
            assert chunk.startswith(src.text) and (src.text == chunk or chunk[len(src.text)] == " "), src.text
            seen.add(src.text)
        assert all(s.text != "x" * k for s in p.sources for k in range(1, 30))  # no piece of the long word
    assert {"The vault code is", "The vault code is 1544803 and the uuid"} <= seen


def test_question_too_long_and_window_budget():
    assert token_budget(512, 64, ReaderConfig()) == 448
    assert token_budget(None, 64, ReaderConfig(max_prompt_tokens=100)) == 100
    assert token_budget(100_000, 64, ReaderConfig(max_prompt_tokens=100)) == 100
    with pytest.raises(QuestionTooLongError, match="budget is 30"):
        build_prompt("x" * 40, hits("a"), CharTok(), budget=30)


def _sources(*texts: str) -> list[Source]:
    return [Source(f"d{i}", f"c{i}", t, 1.0 - i / 10, {}, marker=i + 1) for i, t in enumerate(texts)]


def test_cite_explicit_markers_in_order_of_use():
    src = _sources("the miller", "the harbour", "the garden")
    out = cite("It is in the garden [3], as the harbour log says [2][3]. [9] is bogus.", src)
    assert [s.chunk_id for s in out] == ["c2", "c1", "c0"]
    assert [s.cited for s in out] == [True, True, False] and out[0].support == 1.0


def test_cite_by_lexical_overlap():
    src = _sources("The vault opens with code 7731 under the mill.", "Pears grow in the walled garden.")
    out = cite("The walled garden grows pears", src)
    assert out[0].chunk_id == "c1" and out[0].cited and out[0].support == pytest.approx(3 / 4)
    assert not out[1].cited
    junk = cite("zq xv wk", src)  # noise: nothing cited, retrieval order kept
    assert [s.chunk_id for s in junk] == ["c0", "c1"] and not any(s.cited for s in junk)
