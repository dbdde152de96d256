"""Weighted reciprocal-rank fusion (Cormack et al. 2009): score(d) = sum_r w_r / (k + rank_r(d))."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def rrf(
    rankings: Mapping[str, Sequence[int]], weights: Mapping[str, float] | None = None, k: int = 60
) -> list[tuple[int, float]]:
    """Fuse ranked lists of item ids (best first, rank 1 = first) into ``[(item, score)]``, best first.

    Items missing from a list get nothing from it. Ties break by the best single rank, then by item id,
    so the order is deterministic.
    """
    assert k > 0, f"RRF k must be positive, got {k}"
    weights = weights or {}
    score: dict[int, float] = {}
    best: dict[int, int] = {}
    for name, items in rankings.items():
        w = float(weights.get(name, 1.0))
        assert w >= 0, f"RRF weight for {name!r} must be >= 0, got {w}"
        for rank, item in enumerate(items, start=1):
            score[item] = score.get(item, 0.0) + w / (k + rank)
            best[item] = min(best.get(item, rank), rank)
    return sorted(score.items(), key=lambda it: (-it[1], best[it[0]], it[0]))
