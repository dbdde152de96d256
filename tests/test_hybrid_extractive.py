"""Copy-constrained decoding (hybrid/extractive.py) against a brute-force reference (tests/copy_reference.py)."""

from __future__ import annotations

import random

import pytest
import torch
from copy_reference import allowed, valid

from hybrid.extractive import ValueCopy, token_texts

# a toy vocabulary (id 0 = stop): words, digit pieces with and without leading space, punctuation, "-"
TEXTS = [
    "",
    " the",
    " sun",
    "is",
    "ly",
    " 15",
    " 27",
    " 40",
    "44",
    "80",
    "3",
    "-",
    ",",
    " ",
    ".",
    "a1",
    "x ",
    "5.",
]
SOURCE = "the sun is 1544803, see 27-a1 and 40s."


def mask_set(c: ValueCopy) -> set[int]:
    return {int(t) for t in torch.nonzero(c.mask()).flatten()}


@pytest.mark.parametrize("seed", range(30))
def test_mask_equals_brute_force_along_random_walks(seed: int) -> None:
    """Every step of a random constrained walk: mask == the reference, which re-splits the whole answer."""
    rng = random.Random(seed)
    src = SOURCE if seed % 2 else " ".join(rng.choice(TEXTS[1:]) for _ in range(rng.randrange(1, 12)))
    c = ValueCopy(src, TEXTS, stop_ids=[0])
    answer = ""
    for _ in range(25):
        got = mask_set(c)
        assert got == allowed(answer, src, TEXTS, 0), (src, answer)
        t = rng.choice(sorted(got))
        c.advance(t)
        answer = "" if t == 0 else answer + TEXTS[t]
        assert valid(answer, src)


def test_a_value_cannot_be_garbled_or_cut_but_words_around_it_are_free() -> None:
    """The failure seen on the NIAH grid ("40" + "44803") cannot start; a copy cannot skip or change a piece nor
    stop halfway into another word; the reader's own words stay allowed."""
    c = ValueCopy(SOURCE, TEXTS, stop_ids=[0])
    m = mask_set(c)
    assert {5, 7, 1, 4} <= m  # " 15", " 40" (the source has "40s"), " the", "ly"
    for t in (4, 5, 8):  # "ly 1544"
        c.advance(t)
    # only "80" continues "1544" (punctuation keeps the word open, stop is always allowed); no new word
    assert mask_set(c) == {0, 9, 12, 14}
    for t in (9, 10):  # "1544803"
        c.advance(t)
    assert {12, 14, 13, 1, 2} <= mask_set(c)  # complete: punctuation or a new word may follow
    c2 = ValueCopy(SOURCE, TEXTS, stop_ids=[0])
    c2.advance(7)  # " 40" begins "40s": a finished "40" is not a source value
    assert mask_set(c2) == {0, 12, 14}  # no "s" token here: only stop or punctuation that keeps it open


def test_token_texts_and_bad_sources() -> None:
    class Tok:
        def decode(self, ids: list[int]) -> str:
            return TEXTS[ids[0]] if ids[0] < len(TEXTS) else ""

    assert token_texts(Tok(), 20) == TEXTS + ["", ""]
    with pytest.raises(ValueError, match="source text"):
        ValueCopy("  ", TEXTS, stop_ids=[0])
