"""RULER's NIAH scoring, reproduced exactly (RULER scripts/eval/synthetic/constants.py and evaluate.py).

* ``postprocess_pred``: strip, then replace every control character with ``"\\n"`` (evaluate.py:50-58).
* ``string_match_all``: per sample, the fraction of references that are case-insensitive substrings of the
  prediction; averaged over samples, x100, rounded to 2 decimals. Used for all NIAH tasks.
* ``string_match_part``: per sample, 1 if *any* reference occurs; averaged, x100, rounded (RULER QA metric;
  LMEH's port gives fractional credit instead, which we deliberately do not copy).

Neither metric penalises extra output, so systems must share a generation cap (the runner enforces one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(pred: str) -> str:
    """RULER's prediction clean-up: strip, then control characters -> newline."""
    return _CONTROL.sub("\n", pred.strip())


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions but {len(refs)} reference lists")
    if not preds:
        raise ValueError("cannot score an empty prediction list")
    for i, ref in enumerate(refs):
        if isinstance(ref, str) or len(ref) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {ref!r}")


def sample_match_all(pred: str, ref: Sequence[str]) -> float:
    """One sample's ``string_match_all`` in [0, 1] (no x100, no rounding)."""
    p = pred.lower()
    return sum(1.0 if r.lower() in p else 0.0 for r in ref) / len(ref)


def sample_match_part(pred: str, ref: Sequence[str]) -> float:
    """One sample's ``string_match_part`` in {0, 1}."""
    p = pred.lower()
    return max(1.0 if r.lower() in p else 0.0 for r in ref)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER ``string_match_all``: mean fraction of references found, x100, rounded to 2 decimals."""
    _check(preds, refs)
    score = sum(sample_match_all(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER ``string_match_part``: share of samples with any reference found, x100, rounded to 2 decimals."""
    _check(preds, refs)
    score = sum(sample_match_part(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds) * 100
    return round(score, 2)
