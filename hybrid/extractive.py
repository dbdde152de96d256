"""Copy-constrained decoding of lookup answers: numbers and identifiers are copied from the sources verbatim.

A lookup answer states an exact fact that stands in the retrieved text. A small reader that reads the right
chunk still garbles the value it copies: on the NIAH grid (CPU, shipped reader, retrieval recall 100%) a third
of the wrong ``s-niah`` answers had one wrong leading token in an otherwise copied value (``4044803`` for
``1544803``), others a digit inserted or changed. Constrained decoding removes that failure mode without
training, while the reader stays free to phrase the rest of its answer (a strict "the whole answer is one
source span" rule was tried first: it turned "The ... is 1328257." into a copied "The sun is yellow.").

The rule, on the text. A *word* is a maximal run of non-whitespace characters; its *core* is the word without
the punctuation in ``BOUNDARY_CHARS`` at either end (``-`` is not stripped: a UUID is one word). A *digit word*
has a decimal digit in its core.

- every finished word of the answer (whitespace follows it) that is a digit word must be, as a core, a
  complete digit word of the sources;
- the word being written, if it is a digit word, must be a prefix of one;
- words without digits are free; the stop tokens (end of sequence) are always allowed.

Measured (CPU, shipped reader, 69 paired NIAH samples, ``eval/results/niah-cpu-copy-{a,b}/``): no accuracy change
against free generation. Its wrong values are mostly numbers that do stand in the sources (the reader's favourite
first token "40" is a word of the essays), which the rule allows; hence ``ReaderConfig.extractive`` is off by
default. Copying from the top-ranked source only (``ReaderConfig.extractive_sources=1``, NIAH system
``hybrid-copy1``) removes those: s-niah 48 of 51 against 45 of 51 on the same samples, but multi-value questions
lose values that stand in other sources (mv-niah 3.5 of 9 against 5); opt-in as well.

Text the answer was started with (``answer_start``, e.g. RULER's answer prefix) counts as written: its last
word may still be open. ``ValueCopy.mask()`` gives the tokens whose text keeps the answer within the rule, as a
(V,) mask; greedy or sampled decoding then picks among them by the model's own preferences
(``ttt.generate.generate_iter(constraint=...)``). The reference implementation the tests compare against
re-checks the whole answer text for every candidate (``tests/copy_reference.py``).

Value answers (``ValueAnswer``, ``ReaderConfig.value_answers``, on by default) go further for a question that
names the type of value it asks for (``value_question``: "number", "code", "uuid", ...): the answer is source
values and separators only, so the reader can no longer restate the key instead of answering, the failure copying
alone left (README, NIAH: s-niah-1/2/3 100 / 93 / 86 against 86 / 93 / 71 free on 137 paired GPU samples). A
single value comes from one sentence: of the sources' sentences that hold a value, the one closest to the
question (``best_value_sentence``), which keeps "40 years ago" and other keys' needles out (CPU seed 7: 68.25
against 56.25 of 81 NIAH samples, top source only; every source since session 10, for paraphrased keys); where
that sentence holds several values, the clause that leads up to a value and is closest to the question
(``value_clauses``): a haystack cut mid-sentence glues the needle onto "... than it was 40 years", the last two CPU
grid misses. A list ("all the numbers for X", a plural noun) takes every value of
the units that stand out as relevant (``relevant_value_units``) and may stop only once it holds all of them
(``ValueAnswer(exhaustive=True)``). With the short answer reserve of a value question
(``ReaderConfig.value_answer_tokens``, so more sources fit the window), CPU mv+mq-niah 12.75 vs 10.25 of 18 (seed 7)
and 13.75 vs 11.0 (seed 42), no answer worse: the reader had stopped after two of four values. A value the question
states (its key: "the uuid for be8c2194-...") is never the answer, unless the source holds no other; a single
value prefers the sentence, in any source, that holds that key and another value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

BOUNDARY_CHARS = ",.;:!?()[]{}\"'"


def token_texts(tok: Any, vocab_size: int) -> list[str]:
    """The text of every id in [0, vocab_size) decoded alone (ids a tokenizer lacks decode to '')."""
    return [tok.decode([i]) for i in range(vocab_size)]


def _has_digit(s: str) -> bool:
    return any(ch.isdigit() for ch in s)


def _core(word: str) -> str:
    return word.strip(BOUNDARY_CHARS)


def digit_words(text: str) -> set[str]:
    """The cores of ``text``'s words that hold a digit (the values a rule may copy)."""
    return {c for c in map(_core, text.split()) if _has_digit(c)}


def _prefixes(words: Iterable[str]) -> set[str]:
    """Every non-empty prefix of every word."""
    return {w[:i] for w in words for i in range(1, len(w) + 1)}


class ValueCopy:
    """The rule of the module doc over the sources' text. Use: ``mask()`` before each step, then
    ``advance(token)`` with the token chosen."""

    def __init__(
        self, source_text: str, texts: Sequence[str], *, stop_ids: Iterable[int], answer_start: str = ""
    ) -> None:
        if not source_text.strip():
            raise ValueError("ValueCopy needs source text to copy from")
        self.complete = digit_words(source_text)  # digit words of the sources
        self.prefixes = _prefixes(self.complete)
        self.texts = list(texts)
        self.stop = sorted({int(t) for t in stop_ids})
        V = len(self.texts)
        assert all(0 <= t < V for t in self.stop), f"stop ids must lie in [0, {V})"
        self.lead_ws = torch.tensor([x[:1].isspace() for x in self.texts], dtype=torch.bool)
        # tokens that can be checked by their digits alone when the open word has none (no inner whitespace)
        self.simple = torch.tensor([not any(ch.isspace() for ch in x) for x in self.texts], dtype=torch.bool)
        self.digit = torch.tensor([_has_digit(x) for x in self.texts], dtype=torch.bool)
        self.standalone = torch.tensor([self._tail_ok("", x) for x in self.texts], dtype=torch.bool)
        # the word being written (the answer's trailing non-whitespace run); an answer start may have begun it
        self.open = "" if not answer_start or answer_start[-1].isspace() else answer_start.split()[-1]

    def _word_ok(self, word: str, finished: bool) -> bool:
        c = _core(word)
        if not _has_digit(c):
            return True
        return c in (self.complete if finished else self.prefixes)

    def _tail_ok(self, open_word: str, x: str) -> bool:
        """Whether the words of ``open_word + x`` (the only ones a token x can change) keep the rule."""
        tail = open_word + x
        parts = tail.split()
        if not parts:
            return True
        ends_open = not tail[-1].isspace()
        finished = parts[:-1] if ends_open else parts
        if not all(self._word_ok(p, True) for p in finished):
            return False
        return not ends_open or self._word_ok(parts[-1], False)

    def mask(self) -> torch.Tensor:
        """(V,) bool: the tokens allowed next."""
        if not self.open:
            m = self.standalone.clone()
        else:
            # a token with leading whitespace finishes the open word, then stands alone
            m = (
                self.standalone & self.lead_ws
                if self._word_ok(self.open, True)
                else torch.zeros_like(self.lead_ws)
            )
            extend = ~self.lead_ws
            if not _has_digit(_core(self.open)):  # digit-free tokens keep a digit-free word digit-free
                m |= extend & self.simple & ~self.digit
                extend = extend & ~(self.simple & ~self.digit)
            for i in torch.nonzero(extend).flatten().tolist():
                m[i] = self._tail_ok(self.open, self.texts[i])
        m[self.stop] = True
        return m

    def advance(self, token: int) -> None:
        """Record the token chosen (it must have been allowed by ``mask``)."""
        t = int(token)
        if t in self.stop:
            self.open = ""
            return
        tail = self.open + self.texts[t]
        self.open = "" if not tail or tail[-1].isspace() else tail.split()[-1]


# ---- value answers: the whole answer is values copied from the sources ------------------------------------
# Nouns by which a question asks for a value (a number, code or identifier: a word with a digit in the sources).
# Answer-type detection as in classic factoid QA: the noun names the answer's type. Plural nouns ask for a list.
VALUE_NOUNS = frozenset("number numeral code pin passcode password id identifier uuid serial digits".split())
# questions that ask for a thing (not why / how / explain ...): the first word is one of these
ASKING_WORDS = frozenset("what which give list find tell name provide return show".split())
_WORDS = re.compile(r"[a-z]+")


def value_question(question: str) -> str | None:
    """'one' when ``question`` asks for a thing (first word in ``ASKING_WORDS``) by a noun of ``VALUE_NOUNS``
    ('What is the code of ...?'), 'many' when by a plural ('What are all the numbers for ...?'), else None
    ('Why does the code fail?', 'Summarize the numbers'). Lexical: 'What does the code do?' counts too."""
    words = _WORDS.findall(question.lower())
    if not words or words[0] not in ASKING_WORDS:
        return None
    if any(w.endswith("s") and w[:-1] in VALUE_NOUNS for w in words):
        return "many"
    return "one" if any(w in VALUE_NOUNS for w in words) else None


# sentence ends: [.!?] then whitespace or a capital / quote glued on ("ago.The next"), or a line break
_SENTENCE_END = re.compile(r"(?<=[.!?])(?:\s+|(?=[A-Z\"']))|\n+")


def value_sentences(text: str) -> list[str]:
    """The sentences of ``text`` that hold a value (a word with a digit), in order."""
    parts = (p.strip() for p in _SENTENCE_END.split(text))
    return [p for p in parts if digit_words(p)]


def value_clauses(sentence: str, known: Iterable[str] = ()) -> list[str]:
    """``sentence`` cut after each of its values: clause i runs from the word after value i-1 through value i;
    words after the last value stay with the last clause. One clause when the sentence holds fewer than two
    distinct values. A haystack cut mid-sentence glues a needle onto the previous sentence ("... than it was 40
    years One of the special magic numbers for ... is: 7797027."), so each value is judged by the words that lead
    up to it, the way a fact states a key then its value. Values in ``known`` (those the question states: a key
    such as "the uuid for be8c2194-...") are words like any other: they neither end a clause nor count."""
    words, known = sentence.split(), set(known)
    if len(digit_words(sentence) - known) < 2:
        return [sentence] if words else []
    clauses: list[list[str]] = [[]]
    for w in words:
        clauses[-1].append(w)
        if _has_digit(_core(w)) and _core(w) not in known:
            clauses.append([])
    if not clauses[-1]:
        clauses.pop()
    elif len(clauses) > 1:  # trailing words without a value: part of the last value's clause
        clauses[-2].extend(clauses.pop())
    return [" ".join(c) for c in clauses]


def _scores(
    question: str, texts: list[str], similarity: Callable[[str, list[str]], Sequence[float]]
) -> list[float]:
    scores = list(similarity(question, texts))
    assert len(scores) == len(texts), f"similarity gave {len(scores)} scores for {len(texts)} texts"
    return scores


def _most_similar(
    question: str, texts: list[str], similarity: Callable[[str, list[str]], Sequence[float]]
) -> str:
    """The text most similar to ``question`` (the first on ties; one text is returned without asking)."""
    if len(texts) == 1:
        return texts[0]
    scores = _scores(question, texts, similarity)
    return texts[max(range(len(texts)), key=lambda i: scores[i])]


def best_value_sentence(
    question: str,
    text: str,
    similarity: Callable[[str, list[str]], Sequence[float]],
    *,
    more: Sequence[str] = (),
) -> str | None:
    """The span a single-value answer takes its candidates from, out of ``text`` (the top source) and ``more``
    (the other sources, in rank order); None when no source holds a value. First the sentence most similar to
    ``question`` among: the sentences that hold a value the question states (its key, "the uuid for
    be8c2194-...") and one it does not; else the sentences with a value the question does not state (a chunk that
    holds the needle often holds other numbers too: "more addictive than it was 40 years ago"); else any sentence
    of ``text`` with a value. Every source's sentences compete: retrieval ranks chunks, and when the question
    shares no words with its answer (a paraphrased key) several chunks of one template rank alike while the
    answer's own sentence is still the closest. Then, when that sentence holds several values the question does
    not state, its ``value_clauses`` clause most similar to ``question``. Ties go to the first (the top source)."""
    known = digit_words(question)
    sents = value_sentences(text)
    cands = [(s, digit_words(s)) for s in sents + [s for t in more for s in value_sentences(t)]]
    keyed = [s for s, v in cands if v & known and v - known]
    pool = keyed or [s for s, v in cands if v - known] or sents
    if not pool:
        return None
    return _most_similar(
        question, value_clauses(_most_similar(question, pool, similarity), known), similarity
    )


def value_units(text: str, known: Iterable[str] = ()) -> list[str]:
    """The ``value_clauses`` of every sentence of ``text`` that holds a value, in order."""
    return [c for sent in value_sentences(text) for c in value_clauses(sent, known)]


def relevant_value_units(
    question: str, text: str, similarity: Callable[[str, list[str]], Sequence[float]]
) -> list[str]:
    """The units of ``text`` (``value_units``, the question's own values kept inside) that a list answer takes
    its values from: ranked by similarity to ``question``, those above the widest gap between consecutive scores
    (the first gap on ties) and a floor of 0 below the lowest, in text order (the floor keeps every unit when all
    are alike). Parameter-free: "all the numbers for X" finds X's needles, scored together well above the
    essay's other numbers."""
    units = value_units(text, known=digit_words(question))
    if not units:
        return units
    scores = _scores(question, units, similarity)
    order = sorted(range(len(units)), key=lambda i: -scores[i])
    ranked = [scores[i] for i in order] + [min(0.0, scores[order[-1]])]
    gaps = [ranked[j] - ranked[j + 1] for j in range(len(order))]
    cut = max(range(len(gaps)), key=lambda j: gaps[j]) + 1
    keep = set(order[:cut])
    return [u for i, u in enumerate(units) if i in keep]


def _split(word: str) -> tuple[int, str, int]:
    """(leading punctuation count, core, trailing punctuation count) of a word."""
    core = word.strip(BOUNDARY_CHARS)
    if not core:
        return len(word), "", 0
    lead = len(word) - len(word.lstrip(BOUNDARY_CHARS))
    return lead, core, len(word) - lead - len(core)


class ValueAnswer:
    """The strict rule of a value question: the answer is values of the sources and nothing else.

    Every word of the answer is a value or a separator. A value word is a value with at most one punctuation
    character (``BOUNDARY_CHARS``) on either side: finished, its core is a complete digit word of the sources not
    written before; being written, a prefix of one not written yet (a complete one once punctuation follows). A separator is one punctuation character,
    after a value and not after another separator. With ``single``, one value at most. The stop tokens are
    allowed once a value is complete (no value is half-written); with ``exhaustive`` (a list, not ``single``),
    once every value is written. So the reader chooses which values (with ``exhaustive``: their order), never
    whether to answer with one, and cannot trail off into punctuation. ``mask()`` / ``advance()`` as
    ``ValueCopy``. Values in ``known`` (those the question states: "the uuid for be8c2194-...") are none of the
    answer's, unless the source holds no other ("Which code, 4411 or 5522, opens it?").
    """

    def __init__(
        self,
        source_text: str,
        texts: Sequence[str],
        *,
        stop_ids: Iterable[int],
        single: bool,
        exhaustive: bool = False,
        known: Iterable[str] = (),
    ) -> None:
        values = digit_words(source_text)
        self.complete = (values - set(known)) or values
        self.exhaustive = exhaustive and not single
        if not self.complete:
            raise ValueError("ValueAnswer needs a value (a word with a digit) in the source text")
        self.prefixes = _prefixes(self.complete)
        chars = set("".join(self.complete)) | set(BOUNDARY_CHARS)
        self.texts, self.single = list(texts), single
        self.stop = sorted({int(t) for t in stop_ids})
        assert all(0 <= t < len(self.texts) for t in self.stop), "stop ids must lie in the vocabulary"
        # the only tokens that can ever be allowed: made of value characters, punctuation and whitespace
        self.cands = [
            i for i, x in enumerate(self.texts) if x.strip() and all(ch in chars or ch.isspace() for ch in x)
        ]
        self.open = ""  # the word being written
        self.written: list[str] = []  # the values finished before it
        self.after_sep = False  # the last finished word is a separator
        self.left_prefixes = self.prefixes  # prefixes of the values not written yet

    def _tail_ok(self, x: str) -> bool:
        """Whether the words of ``open + x`` (the only ones a token x can change) keep the rule."""
        tail = self.open + x
        parts = tail.split()
        seen, after_sep = set(self.written), self.after_sep
        for k, word in enumerate(parts):
            lead, core, trail = _split(word)
            if not core:  # a separator
                if not seen or after_sep or lead > 1:
                    return False
                after_sep = True
                continue
            if lead > 1 or trail > 1 or (self.single and seen):
                return False
            if k == len(parts) - 1 and not tail[-1].isspace():  # the open word: a prefix of a value left
                if trail:  # punctuation closes the value
                    return core in self.complete and core not in seen
                if len(seen) == len(self.written):
                    return core in self.left_prefixes
                return any(v.startswith(core) for v in self.complete - seen)
            if core not in self.complete or core in seen:
                return False
            seen.add(core)
            after_sep = False
        return True

    def mask(self) -> torch.Tensor:
        """(V,) bool: the tokens allowed next."""
        m = torch.zeros(len(self.texts), dtype=torch.bool)
        for i in self.cands:
            m[i] = self._tail_ok(self.texts[i])
        c = _core(self.open)
        fresh = c in self.complete and c not in self.written
        # stop: a value is complete (with ``exhaustive``: every value is written), or nothing else is left (a
        # vocabulary that cannot finish this value)
        ends = fresh or (c == "" and bool(self.written))
        if self.exhaustive:
            ends = ends and len(self.written) + fresh == len(self.complete)
        if ends or not m.any():
            m[self.stop] = True
        return m

    def advance(self, token: int) -> None:
        """Record the token chosen (it must have been allowed by ``mask``)."""
        t = int(token)
        if t in self.stop:
            return
        tail = self.open + self.texts[t]
        parts = tail.split()
        ends_open = not tail[-1].isspace()
        for word in parts[:-1] if ends_open else parts:
            core = _core(word)
            self.after_sep = not core
            if core:
                self.written.append(core)
                self.left_prefixes = _prefixes(self.complete - set(self.written))
        self.open = parts[-1] if ends_open else ""
