"""Token-aware chunker: fixed token budget with overlap, preferring sentence boundaries.

A "token" here is a whitespace-free run of word characters or one punctuation mark
(``\\w+|[^\\w\\s]``), a close, cheap proxy for the embedder's word pieces. A chunk holds at most
``max_tokens`` tokens; it ends at the last sentence start found in its second half (else at the
token budget), and the next chunk starts at the first sentence start within the last
``overlap_tokens`` tokens (else exactly ``overlap_tokens`` back). Chunks carry character offsets
into the document, so ``text[start:end] == chunk.text``, and stable ids
``"{doc_id}#{start}-{sha1(text)[:10]}"``: the same document always yields the same ids.

Huge documents stream: ``iter_chunks`` accepts an iterable of string pieces and keeps only a
bounded window (``window_chars``) in memory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_TOKEN = re.compile(r"\w+|[^\w\s]")
# A sentence starts after . ! ? (optionally followed by closing quotes/brackets) plus whitespace,
# or after a blank line (paragraph break).
_SENT_BREAK = re.compile(r"[.!?][\"')\]\u201d\u2019]*\s+|\n\s*\n")


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a document. ``start``/``end`` are character offsets into the document."""

    id: str
    doc_id: str
    text: str
    start: int
    end: int


@dataclass(kw_only=True, frozen=True)
class ChunkerConfig:
    max_tokens: int = 128  # chunk budget in lexical tokens (MiniLM truncates at 256 word pieces)
    overlap_tokens: int = 16  # tokens shared by consecutive chunks
    window_chars: int = 1 << 20  # streaming window: text kept in memory at once

    def __post_init__(self) -> None:
        assert self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"
        assert 0 <= self.overlap_tokens < self.max_tokens, (
            f"need 0 <= overlap_tokens < max_tokens, got {self.overlap_tokens}, {self.max_tokens}"
        )
        assert self.window_chars >= 1024, f"window_chars must be >= 1024, got {self.window_chars}"


def chunk_id(doc_id: str, start: int, text: str) -> str:
    """Stable chunk id: document id + character offset + content hash."""
    return f"{doc_id}#{start}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:10]}"


def chunk_text(doc_id: str, text: str, cfg: ChunkerConfig | None = None) -> list[Chunk]:
    """All chunks of one in-memory document."""
    return list(iter_chunks(doc_id, [text], cfg))


def _plan(spans: list[tuple[int, int]], sent: list[bool], cfg: ChunkerConfig, final: bool):
    """Yield (first_token, end_token) chunk ranges over ``spans``; stops early unless ``final``.

    The last yielded element is the start token of the next chunk (``None`` when done).
    """
    n, s = len(spans), 0
    while s < n:
        e = min(s + cfg.max_tokens, n)
        if e == n and not final:
            yield s  # not enough lookahead: resume from s once more text arrives
            return
        if e < n:  # prefer to end right before a sentence start in the chunk's second half
            for j in range(e, s + cfg.max_tokens // 2, -1):
                if sent[j]:
                    e = j
                    break
        yield (s, e)
        if e == n:
            break
        nxt = max(e - cfg.overlap_tokens, s + 1)
        for j in range(nxt, e):  # earliest sentence start inside the overlap window
            if sent[j]:
                nxt = j
                break
        s = nxt
    yield None


def iter_chunks(doc_id: str, pieces: Iterable[str], cfg: ChunkerConfig | None = None) -> Iterator[Chunk]:
    """Stream chunks of a document given as consecutive string pieces (memory bounded by the window)."""
    cfg = cfg or ChunkerConfig()
    buf, base = "", 0  # buf holds document text from char offset `base`
    it = iter(pieces)
    done = False
    while not done:
        while len(buf) < cfg.window_chars and not done:
            piece = next(it, None)
            if piece is None:
                done = True
            else:
                buf += piece
        # when more text may follow, only tokenize up to the last whitespace (no cut tokens)
        limit = len(buf) if done else max(buf.rfind(" ", 0, len(buf)), buf.rfind("\n"), 0)
        spans = [m.span() for m in _TOKEN.finditer(buf, 0, limit)]
        if not spans:
            if not done and len(buf) >= cfg.window_chars:  # no whitespace in a full window: read more
                cfg = _grow(cfg)
            buf, base = buf[limit:], base + limit
            continue
        breaks = {m.end() for m in _SENT_BREAK.finditer(buf, 0, limit)}
        sent = [i == 0 or a in breaks for i, (a, _) in enumerate(spans)]
        sent.append(True)  # sentinel: the end of the window is a boundary
        resume = None
        for step in _plan(spans, sent, cfg, final=done):
            if not isinstance(step, tuple):
                resume = step
                break
            a, b = spans[step[0]][0], spans[step[1] - 1][1]
            text = buf[a:b]
            yield Chunk(chunk_id(doc_id, base + a, text), doc_id, text, base + a, base + b)
        if resume is None:
            return
        cut = spans[resume][0]
        buf, base = buf[cut:], base + cut
        if not done and len(buf) >= cfg.window_chars:  # one window fits < max_tokens tokens: grow it
            cfg = _grow(cfg)


def _grow(cfg: ChunkerConfig) -> ChunkerConfig:
    return ChunkerConfig(
        max_tokens=cfg.max_tokens, overlap_tokens=cfg.overlap_tokens, window_chars=cfg.window_chars * 2
    )
