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


def _parts(word: str) -> tuple[str, str, str]:
    core = word.strip(BOUNDARY)
    if not core:
        return word, "", ""
    i = word.index(core)
    return word[:i], core, word[i + len(core) :]


def valid_strict(answer: str, source: str, single: bool, known: frozenset[str] = frozenset()) -> bool:
    """Value answers: words are values (at most one punctuation character on either side; each value once; the
    open word a prefix of a value not written yet) or separators (one punctuation character, after a value, not
    after another separator); ``single``: at most one value; values in ``known`` are none."""
    words = (digit_words(source) - known) or digit_words(source)
    parts = answer.split()
    ends_open = bool(answer) and not answer[-1].isspace()
    finished: list[str] = []
    prev_sep = False
    for i, w in enumerate(parts):
        lead, core, trail = _parts(w)
        if not core:
            if not finished or prev_sep or len(w) > 1:
                return False
            prev_sep = True
            continue
        if len(lead) > 1 or len(trail) > 1 or (single and finished):
            return False
        if i == len(parts) - 1 and ends_open:
            if trail:
                return core in words - set(finished)
            return any(v.startswith(core) for v in words - set(finished))
        if core not in words or core in finished:
            return False
        finished.append(core)
        prev_sep = False
    return True


def can_stop_strict(
    answer: str, source: str, exhaustive: bool = False, known: frozenset[str] = frozenset()
) -> bool:
    """A value answer may end once it holds a value and no value is half-written (an open word that is a value
    not named before counts as complete); ``exhaustive``: once it holds every value."""
    words = (digit_words(source) - known) or digit_words(source)
    cores = [w.strip(BOUNDARY) for w in answer.split()]
    if not any(cores):
        return False
    if exhaustive and {c for c in cores if c} != words:
        return False
    if answer[-1].isspace() or cores[-1] == "":
        return True
    return cores[-1] in words and cores[-1] not in cores[:-1]


def allowed_strict(
    answer: str,
    source: str,
    texts: list[str],
    stop: int,
    single: bool,
    exhaustive: bool = False,
    known: frozenset[str] = frozenset(),
) -> set[int]:
    ok = {
        i
        for i, x in enumerate(texts)
        if i != stop and x.strip() and valid_strict(answer + x, source, single, known)
    }
    can_stop = can_stop_strict(answer, source, exhaustive and not single, known)
    return ok | ({stop} if can_stop or not ok else set())
