"""Rule signals for routing: question form, cue words, quoted strings, numbers, IDs, UUIDs.

Each signal is a named 0/1 (or bounded float) feature. They feed the classifier next to the
sentence embedding, and their names are what `RouteDecision.reason` reports, so a user can see
*why* a question was sent down a path ("quoted string", "uuid", "summary cue", ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

# Words that ask for the gist of the whole corpus.
_BROAD = re.compile(
    r"\b(summar\w*|overview|gist|theme\w*|overall|in general|general\w*|broad\w*|main (?:idea|point|argument|"
    r"theme|conclusion|finding)s?|big picture|in short|nutshell|whole|entire|as a whole|plain (?:words|language)"
    r"|basically|mostly|recurring|common thread|philosophy|approach|tone|mood|message|style|sentiment"
    r"|describe|portray\w*|character(?:i[sz]e)?|arc|evolv\w*|develop\w*)\b",
    re.I,
)
# Words that ask for one exact value.
_EXACT = re.compile(
    r"\b(exact(?:ly)?|verbatim|word for word|quote|name of|number|value|code|id|identifier|date|year|"
    r"how many|how much|how long|how old|price|version|serial|phone|address|email|password|token|key|"
    r"figure|amount|percent\w*|rate|dose|port|hash|checksum|title|listed|recorded|reported|given)\b",
    re.I,
)
# Words that ask to interpret or connect something.
_EXPLAIN = re.compile(
    r"\b(why|explain\w*|significan\w*|mean(?:s|ing)?|role|implications?|impl(?:y|ies)|reveal\w*|"
    r"fit\w*|relate\w*|connect\w*|affect\w*|shape\w*|suggest\w*|reflect\w*|symboli\w*|represent\w*|"
    r"in (?:the )?context|in light of|given|considering|importan\w*|matter\w*)\b",
    re.I,
)
_LOOKUP_OPENER = re.compile(
    r"^\s*(what|which|who|whom|when|where|how (?:many|much|long|old)|on (?:what|which)|in (?:what|which)|"
    r"find|give me the exact|quote|list)\b",
    re.I,
)
_EXPLAIN_OPENER = re.compile(r"^\s*(why|how (?:does|do|did|is|was|has|have|would)|explain|describe)\b", re.I)

_QUOTED = re.compile(r"\"[^\"]+\"|“[^”]+”|‘[^’]+’|(?<![\w])'[^']+'(?![\w])")
_NUMBER = re.compile(r"\d")
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
_MONTH = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*"
_DATE = re.compile(
    rf"\b\d{{1,2}}(st|nd|rd|th)? {_MONTH}\b|\b{_MONTH} \d{{1,2}}\b|\b\d{{1,4}}[/.-]\d{{1,2}}[/.-]\d{{1,4}}\b",
    re.I,
)
_UUID = re.compile(
    r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b|\b[0-9a-f]{12,}\b", re.I
)
# Letter+digit tokens (B-17, ZX-443, a1b2c3d, NCT01234567), hyphenated slugs (blue-harbor-17), #123.
_ID = re.compile(
    r"\b(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\b|#\d+|\b[a-z]+(?:-[a-z]+){2,}\b"
)
_CODE = re.compile(r"\b\w+_\w+\b|\b[a-z]+[A-Z]\w*\b|\b[A-Z][a-z]+[A-Z]\w*\b|--\w+|/\w+/|\w+\.\w{2,4}\b|\(\)")
_PROPER = re.compile(r"(?<=[a-z,;:] )[A-Z][a-z]+")


def _n_words(q: str) -> float:
    return math.log1p(len(q.split())) / 3.0  # ~1 for a 20-word question


# (name, human label used in reasons, function). Order fixes the feature layout: append, never reorder.
SIGNALS: list[tuple[str, str, Callable[[str], float]]] = [
    ("broad_cue", "summary/theme cue", lambda q: float(bool(_BROAD.search(q)))),
    ("exact_cue", "exact-value cue", lambda q: float(bool(_EXACT.search(q)))),
    ("explain_cue", "why/explain cue", lambda q: float(bool(_EXPLAIN.search(q)))),
    ("lookup_opener", "what/which/who/when question", lambda q: float(bool(_LOOKUP_OPENER.search(q)))),
    ("explain_opener", "why/how question", lambda q: float(bool(_EXPLAIN_OPENER.search(q)))),
    ("quoted", "quoted string", lambda q: float(bool(_QUOTED.search(q)))),
    ("number", "number", lambda q: float(bool(_NUMBER.search(q)))),
    ("year", "year", lambda q: float(bool(_YEAR.search(q)))),
    ("date", "date", lambda q: float(bool(_DATE.search(q)))),
    ("uuid", "uuid/hash", lambda q: float(bool(_UUID.search(q)))),
    ("identifier", "ID-like token", lambda q: float(bool(_ID.search(q)))),
    ("code", "code identifier", lambda q: float(bool(_CODE.search(q)))),
    ("proper_noun", "proper noun", lambda q: float(bool(_PROPER.search(q)))),
    (
        "two_clauses",
        "two-part question",
        lambda q: float(bool(re.search(r",\s*(and|or|given|in light)\b", q, re.I))),
    ),
    ("length", "length", _n_words),
]
FEATURE_NAMES: list[str] = [name for name, _, _ in SIGNALS] + ["anchor_x_explain", "anchor_no_explain"]
_ANCHORS = ("quoted", "number", "date", "uuid", "identifier", "code")


def rule_features(questions: list[str]) -> np.ndarray:
    """float32 [N, F] rule signals in `FEATURE_NAMES` order (the signals, then 2 interaction terms)."""
    rows = []
    for q in questions:
        base = {name: fn(q) for name, _, fn in SIGNALS}
        anchor = max(base[a] for a in _ANCHORS)
        # Interactions a linear model cannot form itself: a specific anchor *and* a request to interpret it
        # is the typical fused question; an anchor with no interpretation is the typical lookup.
        rows.append([*base.values(), anchor * base["explain_cue"], anchor * (1.0 - base["explain_cue"])])
    return np.asarray(rows, dtype=np.float32).reshape(len(questions), len(FEATURE_NAMES))  # (N, F)


def active_signals(question: str) -> list[str]:
    """Human labels of the 0/1 signals that fire on ``question`` (for the decision's reason)."""
    return [label for name, label, fn in SIGNALS if name != "length" and fn(question) > 0]
