"""Copy-constrained decoding (hybrid/extractive.py) against a brute-force reference (tests/copy_reference.py)."""

from __future__ import annotations

import random

import pytest
import torch
from copy_reference import allowed, allowed_strict, digit_words, valid, valid_strict

from hybrid.extractive import (
    ValueAnswer,
    ValueCopy,
    best_value_sentence,
    relevant_value_units,
    token_texts,
    value_clauses,
    value_question,
    value_sentences,
)

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


@pytest.mark.parametrize("start", ["", "code", "code ", "code 15", "code 1544803", "code 40", "code 99"])
def test_answer_start_counts_as_written(start: str) -> None:
    """An answer begun by ``answer_start`` continues its open word: the mask after the start equals the
    reference over the whole text (start + answer), along a random walk."""
    rng = random.Random(len(start))
    c = ValueCopy(SOURCE, TEXTS, stop_ids=[0], answer_start=start)
    answer = start
    for _ in range(12):
        got = mask_set(c)
        assert got == allowed(answer, SOURCE, TEXTS, 0), (start, answer)
        t = rng.choice(sorted(got))
        if t == 0:
            break
        c.advance(t)
        answer += TEXTS[t]
    if start == "code 99":  # an open word no source value begins with: only stop is left
        assert mask_set(ValueCopy(SOURCE, TEXTS, stop_ids=[0], answer_start=start)) == {0}


def test_token_texts_and_bad_sources() -> None:
    class Tok:
        def decode(self, ids: list[int]) -> str:
            return TEXTS[ids[0]] if ids[0] < len(TEXTS) else ""

    assert token_texts(Tok(), 20) == TEXTS + ["", ""]
    with pytest.raises(ValueError, match="source text"):
        ValueCopy("  ", TEXTS, stop_ids=[0])


@pytest.mark.parametrize("single,exhaustive", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("seed", range(15))
def test_value_answer_mask_equals_brute_force(seed: int, single: bool, exhaustive: bool) -> None:
    """Value answers: at every step of a random walk the mask equals the reference, every answer written is
    valid, and the walk can only stop holding a complete source value (``exhaustive``: all of them); a value
    the question states (``known``, on odd seeds) is never written."""
    rng = random.Random(seed)
    src = (
        SOURCE if seed % 3 else "".join(rng.choice(TEXTS[5:12] + [" "]) for _ in range(rng.randrange(4, 16)))
    )
    if not any(ch.isdigit() for ch in src):
        src += " 15"
    known = frozenset(sorted(digit_words(src))[:1]) if seed % 2 and len(digit_words(src)) > 1 else frozenset()
    c = ValueAnswer(src, TEXTS, stop_ids=[0], single=single, exhaustive=exhaustive, known=known)
    answer = ""
    for _ in range(40):
        got = mask_set(c)
        assert got == allowed_strict(answer, src, TEXTS, 0, single, exhaustive, known), (src, answer)
        t = rng.choice(sorted(got))
        if t == 0:
            if got == {0}:  # a dead end of the toy vocabulary (no token finishes "40s"): stop is the way out
                break
            cores = [w.strip(",.;:!?()[]{}\"'") for w in answer.split()]
            assert [w for w in cores if w] and all(w in c.complete for w in cores if w), answer
            assert not exhaustive or {w for w in cores if w} == c.complete, answer
            assert not known & set(cores), answer
            break
        c.advance(t)
        answer += TEXTS[t]
        assert valid_strict(answer, src, single, known)


def test_value_answer_forces_a_value_and_one_only() -> None:
    """No stop and no free word before a value; a single answer ends after its value (punctuation aside)."""
    c = ValueAnswer(SOURCE, TEXTS, stop_ids=[0], single=True)
    assert mask_set(c) == {5, 6, 7}  # " 15", " 27", " 40" (of "40s"): a value first
    for t in (5, 8, 9, 10):  # " 1544803"
        c.advance(t)
    assert mask_set(c) == {0, 12, 14}  # stop or punctuation; no second value (" 27") in a single answer
    many = ValueAnswer(SOURCE, TEXTS, stop_ids=[0], single=False)
    for t in (5, 8, 9, 10, 12):  # " 1544803,"
        many.advance(t)
    assert {0, 6, 7} <= mask_set(many) and not {1, 5} & mask_set(many)  # another value, never a free word
    assert not {12, 14} & mask_set(many)  # one punctuation character closes a value: no run of them
    many.advance(6)  # " 27": a prefix of "27-a1" only; "1544803" cannot come again
    assert 0 not in mask_set(many)
    with pytest.raises(ValueError, match="value"):
        ValueAnswer("no digits here", TEXTS, stop_ids=[0], single=True)


@pytest.mark.parametrize(
    "question,kind",
    [("What is the special magic number for x?", "one"), ("Which number unlocks the safe?", "one"),
     ("What are all the special magic numbers for a, b, and c?", "many"), ("Give me the UUIDs of the jobs", "many"),
     ("What is the vault code?", "one"), ("Who waters the pears?", None), ("What is this essay about?", None),
     ("Is this number-free?", None), ("Numbers aside, who won?", None), ("Why does the code fail?", None),
     ("Explain the id scheme", None), ("  which PIN opens it", "one"), ("What does the code do?", "one"), ("", None)],
)  # fmt: skip
def test_value_question(question: str, kind: str | None) -> None:
    assert value_question(question) == kind


def test_value_sentences_split_glued_and_keep_decimals() -> None:
    text = "No digits here. It was 40 years ago.The code is: 1544803.\nPi is 3.14 or so! Why? 27-a1 is last"
    assert value_sentences(text) == [
        "It was 40 years ago.",
        "The code is: 1544803.",
        "Pi is 3.14 or so!",
        "27-a1 is last",
    ]
    assert value_sentences("no values at all. none.") == []


def test_best_value_sentence_takes_the_most_similar_one() -> None:
    """The argmax of the similarity over the sentences with a value (the first on ties); one sentence with a value
    is returned without asking the similarity; None without any."""
    calls: list[list[str]] = []

    def overlap(q: str, sents: list[str]) -> list[float]:
        calls.append(sents)
        words = set(q.lower().split())
        return [float(len(words & set(s.lower().split()))) for s in sents]

    text = "It was 40 years ago. The magic code for the red door is 1544803. The blue door has 27-a1."
    assert (
        best_value_sentence("magic code for the red door?", text, overlap)
        == "The magic code for the red door is 1544803."
    )
    assert best_value_sentence("zzz", text, overlap) == "It was 40 years ago."  # all tie at 0: the first
    calls.clear()
    assert (
        best_value_sentence("red door", "A red door. It opens with 7731.", overlap) == "It opens with 7731."
    )
    assert best_value_sentence("red door", "no value here.", overlap) is None and not calls


@pytest.mark.parametrize(
    "sentence,clauses",
    [("The world is more addictive than it was 40 years One of the magic numbers for x-ray is: 7797027.",
      ["The world is more addictive than it was 40", "years One of the magic numbers for x-ray is: 7797027."]),
     ("In 1990, the code for X was 4411 exactly.", ["In 1990,", "the code for X was 4411 exactly."]),
     ("Codes 12 and 12 repeat.", ["Codes 12 and 12 repeat."]),  # one distinct value: the whole sentence
     ("It was 40 years ago.", ["It was 40 years ago."]), ("", [])],
)  # fmt: skip
def test_value_clauses(sentence: str, clauses: list[str]) -> None:
    got = value_clauses(sentence)
    assert got == clauses
    assert " ".join(got).split() == sentence.split()  # a partition of the words, in order


def test_value_clauses_keep_values_the_question_states() -> None:
    """A key the question names (mk-niah-3: "the uuid for <key>") neither ends a clause nor counts as a value."""
    s = "One of the magic uuids for be8c-21 is: fe11-6d. Then 7 more."
    assert value_clauses(s, known={"be8c-21"}) == [
        "One of the magic uuids for be8c-21 is: fe11-6d.",
        "Then 7 more.",
    ]
    assert value_clauses("The uuid for be8c-21 is: fe11-6d.", known={"be8c-21"}) == [
        "The uuid for be8c-21 is: fe11-6d."
    ]
    assert value_clauses(s) == ["One of the magic uuids for be8c-21", "is: fe11-6d.", "Then 7 more."]


def test_best_value_sentence_narrows_a_glued_sentence_to_the_clause_of_its_value() -> None:
    """A needle glued onto a cut essay sentence: the clause that leads up to the asked value wins over the
    sentence's other number, whose clause shares no words with the question (a bug returning the whole sentence
    or the first clause fails)."""

    def overlap(q: str, sents: list[str]) -> list[float]:
        words = set(q.lower().rstrip("?").split())
        return [float(len(words & set(s.lower().split()))) for s in sents]

    text = "Short one here. Addiction grew for 40 years One of the magic numbers for x-ray is: 7797027."
    got = best_value_sentence("what is the magic number for x-ray?", text, overlap)
    assert got == "years One of the magic numbers for x-ray is: 7797027."
    # the key the question states is no candidate clause: the whole key-value sentence stays
    q = "what is the magic uuid for be8c-21?"
    assert best_value_sentence(q, "The magic uuid for be8c-21 is: fe11-6d.", overlap) == (
        "The magic uuid for be8c-21 is: fe11-6d."
    )


def test_relevant_value_units_take_the_cluster_above_the_widest_gap() -> None:
    """The units scored above the widest gap (a floor of 0 below the lowest), in text order; the question's own
    values stay inside their units. A bug that cuts at the first gap, drops the floor or reorders fails."""

    def overlap(q: str, units: list[str]) -> list[float]:
        words = set(q.lower().rstrip("?").split())
        return [float(len(words & set(u.lower().rstrip(".").split()))) for u in units]

    text = (
        "It was 40 years ago. The magic numbers for red door is 11. The magic numbers for red door is 22.\n"
        "Prices rose 5 percent. One magic numbers for red door is 33."
    )
    q = "what are all the magic numbers for red door?"
    assert relevant_value_units(q, text, overlap) == [
        "The magic numbers for red door is 11.",
        "The magic numbers for red door is 22.",
        "One magic numbers for red door is 33.",
    ]
    alike = "The red door is 11. The red door is 22."  # no gap between them: the floor keeps both
    assert relevant_value_units("red door numbers?", alike, overlap) == alike.replace(". ", ".|").split("|")
    keyed = "The magic numbers for 7x is 11. It was 40 years ago."  # 7x, stated, does not split its sentence
    assert relevant_value_units("what are the magic numbers for 7x?", keyed, overlap) == [
        "The magic numbers for 7x is 11."
    ]
    assert relevant_value_units("anything?", "no values here.", overlap) == []


def test_value_answer_never_writes_a_value_the_question_states_unless_it_is_all() -> None:
    """mk-niah-3: the question names its key by a UUID; the answer may not be that key. A choice question whose
    source holds only the stated values keeps them."""
    sent = "One of the magic uuids for be8c-21 is: fe11-6d."
    assert ValueAnswer(sent, TEXTS, stop_ids=[0], single=True, known={"be8c-21"}).complete == {"fe11-6d"}
    assert ValueAnswer(sent, TEXTS, stop_ids=[0], single=True).complete == {"be8c-21", "fe11-6d"}
    both = {"be8c-21", "fe11-6d"}
    assert ValueAnswer(sent, TEXTS, stop_ids=[0], single=True, known=both).complete == both


def test_best_value_sentence_reads_every_source() -> None:
    """Without a stated key every source's sentences with a value compete: the closest one wins wherever it is
    (a paraphrased key ranks several chunks of one template alike); ties keep the top source's."""

    def overlap(q: str, sents: list[str]) -> list[float]:
        words = set(q.lower().rstrip("?").split())
        return [float(len(words & set(s.rstrip(".").lower().split()))) for s in sents]

    q = "which number opens the vault of the red door?"
    top = "The vault of the blue gate opens with 4411. It was 40 years ago."
    other = "Essays. The vault of the red door opens with 7797."
    assert best_value_sentence(q, top, overlap, more=[other]) == "The vault of the red door opens with 7797."
    tie = "The vault of the green gate opens with 1234."
    assert best_value_sentence(q, top, overlap, more=[tie]) == "The vault of the blue gate opens with 4411."
    assert best_value_sentence(q, "no value here.", overlap, more=[other]) == (
        "The vault of the red door opens with 7797."
    )


def test_best_value_sentence_prefers_the_sentence_of_the_stated_key_in_any_source() -> None:
    """A question that states a key ("the uuid for be8c-21") takes the sentence that holds that key and another
    value, from whichever source holds it; without one, the top source's sentences with a value it does not state
    (a sentence holding only the key is no answer)."""

    def overlap(q: str, sents: list[str]) -> list[float]:
        words = set(q.lower().rstrip("?").split())
        return [float(len(words & set(s.lower().split()))) for s in sents]

    q = "what is the magic uuid for be8c-21?"
    top = "The magic uuid for aa11-22 is: ff00-99. The magic uuid for be8c-21"  # cut before its value
    other = "The magic uuid for be8c-21 is: 7e57-ab. The magic uuid for cc33-44 is: 0d0d-11."
    assert best_value_sentence(q, top, overlap, more=[other]) == "The magic uuid for be8c-21 is: 7e57-ab."
    # not in view: the top source's most similar sentence with an unstated value, narrowed to its closest clause
    assert best_value_sentence(q, top, overlap) == "The magic uuid for aa11-22"
    assert best_value_sentence(q, "The magic uuid for be8c-21", overlap) == "The magic uuid for be8c-21"
