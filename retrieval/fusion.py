"""Weighted reciprocal-rank fusion (Cormack et al. 2009): score(d) = sum_r w_r / (k + rank_r(d)), optionally with
each retriever's leaders (its top ``leaders`` items) guaranteed a place at the front.

Why leaders: plain RRF rewards items that both retrievers rank moderately over an item that only one of them ranks
first. A paraphrased fact (no words shared with the question) is typically dense rank 1 and absent from BM25's list:
1/61 loses to any item at ranks ~3 and ~5 in both lists (1/63 + 1/65), so a reader that holds three passages never
sees it (measured on the NIAH low-lexical-overlap task at 8K tokens, README). Putting each retriever's top hit first
costs at most one slot per retriever and keeps every hit plain RRF would have kept behind them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def rrf(
    rankings: Mapping[str, Sequence[int]],
    weights: Mapping[str, float] | None = None,
    k: int = 60,
    leaders: int = 0,
) -> list[tuple[int, float]]:
    """Fuse ranked lists of item ids (best first, rank 1 = first) into ``[(item, score)]``.

    Items missing from a list get nothing from it. Order: with ``leaders`` > 0, the items ranked ``<= leaders``
    by any retriever of positive weight come first, by score; then the rest by score. Ties break by the best
    single rank, then by item id, so the order is deterministic. Scores are always the plain RRF scores.
    """
    assert leaders >= 0, f"RRF leaders must be >= 0, got {leaders}"
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
    lead = {
        item
        for name, items in rankings.items()
        if float(weights.get(name, 1.0)) > 0
        for item in items[:leaders]
    }
    return sorted(score.items(), key=lambda it: (it[0] not in lead, -it[1], best[it[0]], it[0]))
