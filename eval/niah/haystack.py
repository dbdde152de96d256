"""Haystacks for NIAH: RULER ``noise`` lines, an essay corpus read from a directory, and needle insertion.

Lengths are counted with the tokenizer of the model under test (anything with ``encode(str) -> list[int]``).
The essay corpus is read at run time only (default ``../shared/data/haystack/pg_essays`` next to the repo
when it exists); the project ships no essays and nothing here is ever used for training.

The haystack is built RULER-style from the *start* of the corpus (repeated when more text is needed), sized
in word pieces so a prompt lands within a few tokens of its target, then cut into segments (sentences for
essays, lines for noise/needle haystacks). Needles are inserted between segments, never inside one.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# RULER scripts/data/synthetic/niah.py:89 (exact).
NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
REPO_ROOT = Path(__file__).resolve().parents[2]
_PIECE = re.compile(r"\S+\s*")
_SENT_END = re.compile(r"[.!?]+[\"')\]]*\s+")


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


def default_essay_dir() -> Path | None:
    """``../shared/data/haystack/pg_essays`` relative to the repo root, or None when it is absent."""
    p = REPO_ROOT.parent / "shared" / "data" / "haystack" / "pg_essays"
    return p if p.is_dir() else None


@dataclass(kw_only=True)
class Corpus:
    """Background text of a haystack kind: ``noise`` (RULER's repeated line) or ``essay`` (a directory)."""

    kind: str  # "noise" | "essay"
    text: str  # essay: whitespace-collapsed concatenation of sorted *.txt; noise: the noise line
    sha256: str  # hash of ``text`` (recorded in results.json)
    source: str  # directory path or "noise"

    def pieces(self, n: int) -> str:
        """The first ``n`` word pieces (word + trailing whitespace), the corpus repeated as needed."""
        assert n >= 0, f"piece count must be >= 0, got {n}"
        unit = _corpus_pieces(self)
        reps, rest = divmod(n, len(unit))
        return ("".join(unit) * reps + "".join(unit[:rest])).rstrip()

    def segments(self, text: str) -> list[str]:
        """Cut haystack text into insertion units: sentences (essay) or lines (noise)."""
        if self.kind == "noise":
            return [s for s in text.split("\n") if s]
        return split_sentences(text)

    @property
    def joiner(self) -> str:
        return "\n" if self.kind == "noise" else " "


_PIECES_CACHE: dict[str, list[str]] = {}


def _corpus_pieces(c: Corpus) -> list[str]:
    if c.sha256 not in _PIECES_CACHE:
        base = c.text + ("\n" if c.kind == "noise" else " ")
        _PIECES_CACHE[c.sha256] = _PIECE.findall(base)
    return _PIECES_CACHE[c.sha256]


def noise_corpus() -> Corpus:
    """RULER's ``noise`` haystack: the one fixed line, repeated and joined with newlines."""
    return Corpus(kind="noise", text=NOISE_LINE, sha256=_sha(NOISE_LINE), source="noise")


def essay_corpus(directory: str | Path | None = None) -> Corpus:
    """All ``*.txt`` under ``directory`` (sorted by name), whitespace-collapsed as RULER does."""
    d = Path(directory) if directory is not None else default_essay_dir()
    if d is None:
        raise FileNotFoundError(
            "no essay haystack: pass --haystack DIR (a directory of .txt files); the default "
            "../shared/data/haystack/pg_essays is absent"
        )
    if not d.is_dir():
        raise FileNotFoundError(f"haystack directory {d} does not exist")
    files = sorted(p for p in d.rglob("*.txt") if p.is_file())
    if not files:
        raise ValueError(f"haystack directory {d} holds no .txt files")
    raw = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    text = re.sub(r"\s+", " ", raw).strip()
    if len(text.split()) < 50:
        raise ValueError(f"haystack directory {d} holds too little text ({len(text.split())} words)")
    return Corpus(kind="essay", text=text, sha256=_sha(text), source=str(d))


def split_sentences(text: str) -> list[str]:
    """Sentence split on ``.!?`` (plus closing quotes/brackets) followed by whitespace.

    A dependency-free stand-in for nltk ``sent_tokenize``: abbreviations such as "e.g. " may split a
    sentence early, which only moves a needle to a nearby boundary; a needle never lands mid-sentence.
    """
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        seg = text[start : m.end()].strip()
        if seg:
            out.append(seg)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def boundary_for_depth(seg_tokens: Sequence[int], depth: float) -> int:
    """Segment boundary whose token offset is the largest one <= ``depth``% of the total (gkamradt walks back
    to the previous sentence end the same way). Boundary ``i`` = before segment ``i``; ``len`` = the end."""
    assert 0.0 <= depth <= 100.0, f"depth must be in [0, 100], got {depth}"
    cum = [0]
    for t in seg_tokens:
        cum.append(cum[-1] + t)
    target = depth / 100.0 * cum[-1]
    return max(0, bisect.bisect_right(cum, target + 1e-9) - 1)


def insert_at_boundaries(segments: list[str], inserts: Sequence[tuple[int, str]]) -> list[str]:
    """Insert ``(boundary, text)`` pairs into ``segments``; several at one boundary keep their given order."""
    by_b: dict[int, list[str]] = {}
    for b, t in inserts:
        assert 0 <= b <= len(segments), f"boundary {b} outside [0, {len(segments)}]"
        by_b.setdefault(b, []).append(t)
    out: list[str] = []
    for i in range(len(segments) + 1):
        out.extend(by_b.get(i, []))
        if i < len(segments):
            out.append(segments[i])
    return out


def fit_units(
    n_tokens: Callable[[int], int], target: int, lo: int = 0, hi: int | None = None, guess: int | None = None
) -> int:
    """Largest unit count ``n`` with ``n_tokens(n) <= target`` (``n_tokens`` non-decreasing in ``n``).

    With ``guess`` (e.g. the answer for a previous sample), the search starts in a narrow bracket around it
    and widens only when needed, so most samples cost a handful of tokenizations.
    """
    if n_tokens(lo) > target:
        raise ValueError(
            f"target length {target} is too short: the prompt without haystack already has "
            f"{n_tokens(lo)} tokens"
        )
    if guess is not None:
        a, b = max(lo, guess - 64), guess + 64
        if (hi is None or b <= hi) and n_tokens(a) <= target < n_tokens(b):
            lo, hi = a, b
    if hi is None:
        hi = max(lo + 1, 64)
        while n_tokens(hi) <= target:  # exponential search for an upper bound
            lo, hi = hi, hi * 2
    elif n_tokens(hi) <= target:
        return hi
    while hi - lo > 1:  # invariant: n_tokens(lo) <= target < n_tokens(hi)
        mid = (lo + hi) // 2
        if n_tokens(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo
