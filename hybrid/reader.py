"""Reader: packs retrieved chunks into a prompt that fits the model, and maps an answer back to them.

Prompt layout (token ids are the concatenation of the segments' encodings, so the token count is exact)::

    <bos>Use the numbered sources to answer. Cite them like [1].
    [1] <best chunk>
    [2] <next chunk>
    ...
    Question: <question>
    Answer:<answer start>

``answer_start`` (default empty) is text the answer begins with: the model continues it, as RULER appends
its answer prefix after the assistant turn (``" The special magic number for ... is"``); the returned answer
is the continuation.

The budget is the model's window minus the tokens to be generated (a sliding-window model then attends
to the whole prompt while it answers, i.e. full attention over it), capped by ``max_prompt_tokens``.
Chunks go in rank order; the first that does not fit is cut to the tokens left (if at least
``min_chunk_tokens``) and everything ranked below it is dropped, so the lowest-ranked text goes first.

Citation mapping: explicit ``[n]`` markers in the answer cite source n; without markers, a source is
cited when enough of the answer's content words occur in it (lexical overlap). Uncited sources are
still returned, after the cited ones, in retrieval order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hybrid.errors import QuestionTooLongError

_MARKER = re.compile(r"\[(\d{1,3})\]")
_WORD = re.compile(r"\w+")
_STOPWORDS = frozenset(
    "a an and are as at be but by did do does for from had has have he her his i in is it its me my no not "
    "of on or our she so that the their them there they this to was we were what when where which who why "
    "will with you your".split()
)


class TextTokenizer(Protocol):
    """What the reader needs from ``ttt.tokenizer.Tokenizer``."""

    bos_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(kw_only=True, frozen=True)
class ReaderConfig:
    header: str = "Use the numbered sources to answer. Cite them like [1].\n"
    question_prefix: str = "Question: "
    answer_prefix: str = "\nAnswer:"
    max_prompt_tokens: int = 4096  # cap even when the window is larger (or None = full attention)
    min_chunk_tokens: int = 8  # a cut chunk shorter than this is dropped instead
    min_overlap_words: int = 2  # lexical citation: at least this many shared content words ...
    min_overlap_frac: float = 0.25  # ... and at least this fraction of the answer's content words
    # True: lookup answers copy their numbers and identifiers verbatim from the numbered sources
    # (hybrid/extractive.py: copy-constrained decoding). Off by default: no accuracy gain measured on NIAH
    # (the reader's wrong values there are mostly numbers that stand in the sources), 26% slower on CPU
    extractive: bool = False
    # with ``extractive``: copy values only from the n top-ranked sources (None = all numbered sources)
    extractive_sources: int | None = None
    # True: a question answered from sources (lookup, fused) that asks for a value by its type noun (number,
    # code, id, uuid, ...: ``hybrid.extractive.value_question``) is answered with values of the sources only
    # (``ValueAnswer``): one from the sources' value sentence closest to the question
    # (``best_value_sentence``), or for a plural noun a list of every value of the sources' units that stand
    # out as relevant (``relevant_value_units``), all of them before it may stop. Other questions, or no value
    # in those sources: as configured above. On by default: on NIAH it beat free generation (CPU, held-out
    # seed 7, 81 paired samples: 55.5 vs 45.75 correct, no task lower; GPU, 137 paired samples: README)
    value_answers: bool = True
    # with ``value_answers``: a value question keeps room for only this many answer tokens when its prompt is
    # built, whatever max_new_tokens is (a 36-character UUID is 33 tokens of the shipped tokenizer), so more
    # sources (and their values) fit the window; a longer answer slides the prompt's first tokens out of the
    # attention window as it grows
    value_answer_tokens: int = 48
    # a > 0: context-aware decoding of lookup answers (ttt.generate.generate_iter contrast_alpha): choices from
    # (1 + a) * logits - a * the logits without the sources (no net effect measured on NIAH: off by default)
    context_contrast: float = 0.0

    def __post_init__(self) -> None:
        assert self.max_prompt_tokens >= 8, f"max_prompt_tokens must be >= 8, got {self.max_prompt_tokens}"
        assert self.min_chunk_tokens >= 1, f"min_chunk_tokens must be >= 1, got {self.min_chunk_tokens}"
        assert 0.0 <= self.min_overlap_frac <= 1.0, f"min_overlap_frac not in [0,1]: {self.min_overlap_frac}"
        assert self.value_answer_tokens >= 1, (
            f"value_answer_tokens must be >= 1, got {self.value_answer_tokens}"
        )
        assert self.context_contrast >= 0.0, f"context_contrast must be >= 0, got {self.context_contrast}"
        assert self.extractive_sources is None or self.extractive_sources >= 1, (
            f"extractive_sources must be None or >= 1, got {self.extractive_sources}"
        )


@dataclass(frozen=True)
class Source:
    """A chunk shown to the reader (or retrieved for the answer), with its retrieval and citation scores."""

    doc_id: str
    chunk_id: str
    text: str  # the text as shown in the prompt (cut when the budget ran out)
    score: float  # retrieval score (fused for hybrid search)
    scores: dict[str, float] = field(default_factory=dict)  # per-retriever scores
    start: int = 0  # character offsets of the chunk in its document
    end: int = 0
    marker: int = 0  # n of the "[n]" marker in the prompt; 0 = not in the prompt
    cited: bool = False  # the answer cites this source (marker or overlap)
    support: float = 0.0  # 1.0 for an explicit marker, else the fraction of answer words found here

    def to_dict(self) -> dict[str, Any]:
        return {
            "doc_id": self.doc_id,
            "chunk_id": self.chunk_id,
            "text": self.text,
            "score": self.score,
            "scores": dict(self.scores),
            "start": self.start,
            "end": self.end,
            "marker": self.marker,
            "cited": self.cited,
            "support": self.support,
        }


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # token ids fed to the model
    sources: list[Source]  # sources in the prompt, marker 1..n in order
    dropped: int  # retrieved chunks that did not fit at all
    truncated: bool  # the last included source was cut
    body: tuple[int, int] = (0, 0)  # ids[body[0]:body[1]] = the numbered sources (markers, text, newlines)


def token_budget(window: int | None, max_new_tokens: int, cfg: ReaderConfig) -> int:
    """Prompt tokens allowed so that prompt + answer stays inside the window (and the cap)."""
    if window is None:
        return cfg.max_prompt_tokens
    return min(window - max_new_tokens, cfg.max_prompt_tokens)


def hit_source(hit: Any, text: str, marker: int) -> Source:
    """``SearchHit``-like -> ``Source`` (marker 0 = not in a prompt)."""
    ch = hit.chunk
    scores = {k: float(v) for k, v in (getattr(hit, "scores", None) or {}).items() if v is not None}
    return Source(ch.doc_id, ch.id, text, float(hit.score), scores, ch.start, ch.end, marker)


def build_prompt(
    question: str,
    hits: Sequence[Any],
    tok: TextTokenizer,
    *,
    budget: int,
    cfg: ReaderConfig | None = None,
    answer_start: str = "",
) -> Prompt:
    """Token ids of header + as many ranked ``hits`` (``SearchHit``-like) as fit + question + answer prefix
    (+ ``answer_start``, the text the answer begins with).

    Raises ``QuestionTooLongError`` when the question (with ``answer_start``) alone does not fit in ``budget``.
    """
    cfg = cfg or ReaderConfig()
    head = ([tok.bos_id] if tok.bos_id is not None else []) + (tok.encode(cfg.header) if hits else [])
    tail = tok.encode(cfg.question_prefix + question.strip()) + tok.encode(cfg.answer_prefix + answer_start)
    left = budget - len(head) - len(tail)
    if left < 0:
        what = "the question and the answer start take" if answer_start else "the question takes"
        raise QuestionTooLongError(
            f"{what} {len(tail)} tokens with the prompt around it; the budget is {budget} tokens "
            f"(window minus max_new_tokens): shorten the question or lower max_new_tokens"
        )
    body: list[int] = []
    sources: list[Source] = []
    truncated = False
    for rank, hit in enumerate(hits, start=1):
        marker = tok.encode(f"[{rank}] ")
        text_ids = tok.encode(hit.chunk.text.strip())
        sep = tok.encode("\n")
        need = len(marker) + len(text_ids) + len(sep)
        if need > left:  # cut the lowest-ranked text that still fits a useful piece, drop the rest
            text_ids = whole_words(
                text_ids[: max(0, left - len(marker) - len(sep))], hit.chunk.text.strip(), tok
            )
            if len(text_ids) >= cfg.min_chunk_tokens:
                body += marker + text_ids + sep
                sources.append(hit_source(hit, tok.decode(text_ids), rank))
                truncated = True
            break
        body += marker + text_ids + sep
        left -= need
        sources.append(hit_source(hit, hit.chunk.text.strip(), rank))
    ids = head + body + tail
    assert len(ids) <= budget, f"prompt of {len(ids)} tokens exceeds the budget {budget}"
    return Prompt(ids, sources, len(hits) - len(sources), truncated, (len(head), len(head) + len(body)))


def whole_words(ids: list[int], text: str, tok: TextTokenizer) -> list[int]:
    """The longest prefix of ``ids`` (a prefix of ``text``'s tokens) that decodes to whole words of ``text``: a
    source cut by the budget must not end in half a word, since a cut number or UUID reads as a wrong value.
    ``ids`` itself when no prefix decodes to a prefix of ``text`` (a normalizing tokenizer)."""
    for n in range(len(ids), 0, -1):
        t = tok.decode(ids[:n])
        if not text.startswith(t):
            continue
        if len(t) == len(text) or text[len(t)].isspace():
            return ids[:n]
    return ids if not text.startswith(tok.decode(ids)) else []


def content_words(text: str) -> set[str]:
    """Lower-cased word tokens minus a small stopword list (used for lexical citation)."""
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def cite(answer: str, sources: Sequence[Source], cfg: ReaderConfig | None = None) -> list[Source]:
    """Mark the sources the answer cites; cited first (markers in order of use, then by overlap).

    ``sources`` must carry the prompt markers 1..n. Returns new ``Source`` objects (inputs unchanged).
    """
    cfg = cfg or ReaderConfig()
    by_marker = {s.marker: s for s in sources if s.marker > 0}
    order: list[int] = []
    for m in _MARKER.finditer(answer):
        n = int(m.group(1))
        if n in by_marker and n not in order:
            order.append(n)
    if order:
        cited = [_with(by_marker[n], 1.0) for n in order]
        rest = [s for s in sources if s.marker not in order]
        return cited + rest
    words = content_words(answer)
    scored: list[tuple[float, int, Source]] = []
    for i, s in enumerate(sources):
        shared = len(words & content_words(s.text))
        frac = shared / len(words) if words else 0.0
        if shared >= cfg.min_overlap_words and frac >= cfg.min_overlap_frac:
            scored.append((frac, i, s))
    scored.sort(key=lambda t: (-t[0], t[1]))
    cited = [_with(s, frac) for frac, _, s in scored]
    chosen = {id(s) for _, _, s in scored}
    return cited + [s for s in sources if id(s) not in chosen]


def _with(s: Source, support: float) -> Source:
    return Source(s.doc_id, s.chunk_id, s.text, s.score, s.scores, s.start, s.end, s.marker, True, support)
