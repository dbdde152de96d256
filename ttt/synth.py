"""Synthetic reading documents made from ONE training book at a time (mixed into the training stream).

Each document is a passage cut from the book followed by a question about it, in the one format the model
is trained to answer (``qa_prompt``)::

    <passage>

    Question: <question>
    Answer: <answer><|eos|>

Kinds (chosen uniformly):
  - ``continue``: quote the first words of a sentence of the passage; the answer is the words that follow.
  - ``copy``: "Repeat this line exactly: <sentence>"; the answer is the sentence.
  - ``number``: a sentence "<Name> wrote down the number <digits>." (Name taken from the passage, 5-9 random
    digits) is inserted at a random paragraph break; the question asks for that number.

The share of synthetic TOKENS in the training stream is ``SynthConfig.share`` (default 10%; measured in
characters at generation time, recorded exactly in tokens by ``ttt.data.build_shards``). Nothing here uses
evaluation material: no RULER templates, no essay haystack; only the training book passed in.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

QUESTION = "Question: "
ANSWER = "Answer:"
KINDS = ("continue", "copy", "number")

_SENT_RE = re.compile(r"(?<=[.!?\u201d])\s+(?=[A-Z\"'\u201c\u2018])")
_NAME_RE = re.compile(r"(?<=[a-z,;] )[A-Z][a-z]{2,14}\b")
_NUMBER_FACTS = (  # (statement, question); our own phrasings
    ("{name} wrote down the number {n}.", "What number did {name} write down?"),
    ("The number on {name}'s door was {n}.", "What was the number on {name}'s door?"),
    ("{name} kept the receipt numbered {n}.", "What was the number of the receipt {name} kept?"),
)


@dataclass(kw_only=True)
class SynthConfig:
    """How many and what kind of synthetic documents ``synth_documents`` makes."""

    share: float = 0.10  # synthetic share of the training stream (chars of synth / chars of book+synth)
    seed: int = 0
    min_passage_chars: int = 300
    max_passage_chars: int = 3000  # keep passages well inside the attention window (~4 chars/token)
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        if not 0 < self.min_passage_chars <= self.max_passage_chars:
            raise ValueError("need 0 < min_passage_chars <= max_passage_chars")


def qa_prompt(context: str, question: str) -> str:
    """The trained question format; the model's answer follows (ends with <|eos|>)."""
    return f"{context}\n\n{QUESTION}{question}\n{ANSWER}"


def synth_documents(book_text: str, book_id: str, cfg: SynthConfig | None = None) -> list[str]:
    """Synthetic docs from one book, about ``share / (1 - share)`` of its length; deterministic per book."""
    cfg = cfg or SynthConfig()
    paragraphs = [p for p in book_text.split("\n\n") if p.strip()]
    if cfg.share <= 0 or not paragraphs:
        return []
    rng = random.Random(f"{cfg.seed}:{book_id}")
    target = cfg.share / (1.0 - cfg.share) * len(book_text)
    docs: list[str] = []
    total, misses = 0, 0
    while total < target and misses < 50:
        passage = _passage(paragraphs, rng, cfg)
        doc = _make(rng.choice(cfg.kinds), passage, rng)
        if doc is None:
            misses += 1
            continue
        if total + len(doc) > target and rng.random() > (target - total) / len(doc):
            break  # stochastic rounding of the last doc keeps the expected share exact for short books
        docs.append(doc)
        total += len(doc)
    return docs


def _passage(paragraphs: list[str], rng: random.Random, cfg: SynthConfig) -> list[str]:
    want = rng.randint(cfg.min_passage_chars, cfg.max_passage_chars)
    i = rng.randrange(len(paragraphs))
    out: list[str] = []
    n = 0
    while i < len(paragraphs) and n < want:
        p = paragraphs[i][: cfg.max_passage_chars - n]
        out.append(p)
        n += len(p) + 2
        i += 1
    return out


def _sentences(passage: list[str], min_words: int) -> list[str]:
    sents = [s.strip() for p in passage for s in _SENT_RE.split(p.replace("\n", " "))]
    return [s for s in sents if len(s.split()) >= min_words]


def _make(kind: str, passage: list[str], rng: random.Random) -> str | None:
    context = "\n\n".join(passage)
    if kind == "continue":
        sents = _sentences(passage, 12)
        if not sents:
            return None
        words = rng.choice(sents).split()
        k = rng.randint(4, 7)
        quote, rest = " ".join(words[:k]), " ".join(words[k : k + rng.randint(5, 12)])
        return qa_prompt(context, f'In the text above, what words come right after "{quote}"?') + " " + rest
    if kind == "copy":
        sents = _sentences(passage, 5)
        if not sents:
            return None
        line = rng.choice(sents)[:300]
        return qa_prompt(context, f"Repeat this line exactly: {line}") + " " + line
    names = _NAME_RE.findall(context)
    if not names:
        return None
    name = rng.choice(names)
    n = str(rng.randint(10 ** (d := rng.randint(5, 9)) // 10, 10**d - 1))
    statement, question = rng.choice(_NUMBER_FACTS)
    at = rng.randint(0, len(passage))
    body = passage[:at] + [statement.format(name=name, n=n)] + passage[at:]
    return qa_prompt("\n\n".join(body), question.format(name=name)) + " " + n
