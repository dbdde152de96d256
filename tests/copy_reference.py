"""Brute-force reference of the copy rule of ``hybrid/extractive.py`` (used by its tests): the whole answer
text is split into words and checked again for every candidate token, no incremental state."""

from __future__ import annotations

import re

BOUNDARY = ",.;:!?()[]{}\"'"


def digit_words(source: str) -> set[str]:
    return {w.strip(BOUNDARY) for w in source.split() if re.search(r"\d", w.strip(BOUNDARY))}


def valid(answer: str, source: str) -> bool:
    """Every finished digit word of the answer is a digit word of the source; the open one a prefix of one."""
    words = digit_words(source)
    parts = answer.split()
    for i, w in enumerate(parts):
        core = w.strip(BOUNDARY)
        if not re.search(r"\d", core):
            continue
        open_word = i == len(parts) - 1 and not answer[-1].isspace()
        if open_word and not any(s.startswith(core) for s in words):
            return False
        if not open_word and core not in words:
            return False
    return True


def allowed(answer: str, source: str, texts: list[str], stop: int) -> set[int]:
    return {i for i, x in enumerate(texts) if i == stop or valid(answer + x, source)}
