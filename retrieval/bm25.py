"""BM25 over a precomputed sparse score matrix, exactly rank-bm25's ``BM25Okapi`` variant.

Scoring (identical to ``rank_bm25.BM25Okapi(k1, b, epsilon)``, parity-tested to 1e-6):

    idf(t)   = log(N - df(t) + 0.5) - log(df(t) + 0.5)        (natural log, may be negative)
    idf(t)   = epsilon * mean_t idf(t)   where idf(t) < 0     (mean over terms present in the corpus)
    s(d, t)  = idf(t) * tf(d,t) * (k1 + 1) / (tf(d,t) + k1 * (1 - b + b * |d| / avgdl))
    s(d, q)  = sum over query tokens t (with repetition) of s(d, t)

Every s(d, t) with tf > 0 is computed at index time (float64) into a CSC matrix (chunks x vocab), so a
query is a sum of column slices plus a partial top-k (the bm25s design, see style.md §5a). Because N,
df and avgdl are global, every version rebuilds the score matrix from the stored term-frequency matrix
(vectorised, O(nnz)): incremental add/delete re-tokenizes only new chunks and keeps exact parity.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptIndexError
from .tokenize import tokenize

log = logging.getLogger(__name__)

_FILES = ("tf_indptr", "tf_indices", "tf_data", "sc_indptr", "sc_indices", "sc_data")


def _sparse():
    try:
        import scipy.sparse as sp
    except ImportError as e:  # pragma: no cover - scipy is a retrieval extra
        raise ImportError("BM25 needs scipy: pip install 'ttt-rag[retrieval]'") from e
    return sp


@dataclass(kw_only=True, frozen=True)
class BM25Config:
    k1: float = 1.5  # term-frequency saturation (rank-bm25 default)
    b: float = 0.75  # length normalisation (rank-bm25 default)
    epsilon: float = 0.25  # floor for negative idf = epsilon * mean idf (rank-bm25 BM25Okapi)
    # exact MaxScore pruning: query terms in more than this fraction of chunks are only scored for rows
    # that match a rarer term, when their summed column maxima cannot reach the k-th score (else full scan)
    prune_df_frac: float = 0.05


def bm25_idf(df: np.ndarray, n_docs: int, epsilon: float) -> np.ndarray:
    """BM25Okapi idf per term (float64); terms with df == 0 get 0 and are excluded from the mean."""
    df = np.asarray(df, dtype=np.float64)
    present = df > 0
    idf = np.zeros_like(df)
    idf[present] = np.log(n_docs - df[present] + 0.5) - np.log(df[present] + 0.5)
    if present.any():
        floor = epsilon * idf[present].mean()
        idf[present & (idf < 0)] = floor
    return idf


class BM25Index:
    """Immutable BM25 index over rows (chunks); ``add``/``keep_rows`` return a new index."""

    def __init__(self, cfg: BM25Config, vocab: dict[str, int], tf) -> None:
        self.cfg, self.vocab, self.tf = cfg, vocab, tf.tocsr()  # tf: (N, V) int32 counts
        assert self.tf.shape[1] == len(vocab), f"tf has {self.tf.shape[1]} columns for {len(vocab)} terms"
        self.scores = self._score_matrix()  # (N, V) float64 CSC

    @classmethod
    def empty(cls, cfg: BM25Config | None = None) -> BM25Index:
        return cls(cfg or BM25Config(), {}, _sparse().csr_matrix((0, 0), dtype=np.int32))

    @property
    def n_rows(self) -> int:
        return self.tf.shape[0]

    def _score_matrix(self):
        sp = _sparse()
        tf, (n, v) = self.tf, self.tf.shape
        if n == 0 or tf.nnz == 0:
            return sp.csc_matrix((n, v), dtype=np.float64)
        k1, b = self.cfg.k1, self.cfg.b
        dl = np.asarray(tf.sum(axis=1)).ravel().astype(np.float64)  # (N,) tokens per chunk
        avgdl = dl.sum() / n
        df = np.bincount(tf.indices, minlength=v)  # (V,) chunks containing each term
        idf = bm25_idf(df, n, self.cfg.epsilon)
        rows = np.repeat(np.arange(n), np.diff(tf.indptr))  # (nnz,) row of each stored entry
        f = tf.data.astype(np.float64)
        data = idf[tf.indices] * (f * (k1 + 1) / (f + k1 * (1 - b + b * dl[rows] / avgdl)))
        return sp.csr_matrix((data, tf.indices, tf.indptr), shape=(n, v)).tocsc()

    def add(self, token_lists: Iterable[list[str]]) -> BM25Index:
        """A new index with one row appended per token list (streamed: lists are not kept)."""
        sp = _sparse()
        vocab = dict(self.vocab)
        lengths: list[int] = []

        def term_ids() -> Iterator[int]:
            for toks in token_lists:
                lengths.append(len(toks))
                yield from (vocab.setdefault(t, len(vocab)) for t in toks)

        ids = np.fromiter(term_ids(), dtype=np.int64)
        n_new = len(lengths)
        rows = np.repeat(np.arange(n_new, dtype=np.int64), np.asarray(lengths, dtype=np.int64))
        new = sp.coo_matrix(
            (np.ones(len(ids), dtype=np.int32), (rows, ids)), shape=(n_new, len(vocab))
        ).tocsr()  # duplicates summed: term counts
        del ids, rows
        old = self.tf.copy()
        old.resize((self.n_rows, len(vocab)))
        return BM25Index(self.cfg, vocab, sp.vstack([old, new], format="csr", dtype=np.int32))

    def add_texts(self, texts: Iterable[str]) -> BM25Index:
        return self.add(tokenize(t) for t in texts)

    def keep_rows(self, keep: np.ndarray) -> BM25Index:
        """A new index with only the rows where ``keep`` (bool, (N,)) is True."""
        assert keep.shape == (self.n_rows,), f"keep mask {keep.shape} != ({self.n_rows},)"
        return BM25Index(self.cfg, self.vocab, self.tf[np.flatnonzero(keep)])

    def get_scores(self, query_tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N,) float64, matched (N,) bool): BM25 score of every row and whether any term hit."""
        sc = self.scores
        out = np.zeros(self.n_rows, dtype=np.float64)
        hit = np.zeros(self.n_rows, dtype=bool)
        for t in query_tokens:
            j = self.vocab.get(t)
            if j is None:
                continue
            a, b = sc.indptr[j], sc.indptr[j + 1]
            rows = sc.indices[a:b]  # distinct rows within one column: fancy += is exact
            out[rows] += sc.data[a:b]
            hit[rows] = True
        return out, hit

    def search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (rows, scores) among rows matching at least one query token, best first."""
        return self.search_tokens(tokenize(query), k)

    def search_tokens(self, query_tokens: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        sc = self.scores
        cols = [j for t in query_tokens if (j := self.vocab.get(t)) is not None]
        cols = [j for j in cols if sc.indptr[j + 1] > sc.indptr[j]]  # terms of deleted rows: no entries
        if not cols:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        if all(sc.data[sc.indptr[j]] > 0 for j in cols):
            # every idf > 0: a row matches iff its score > 0, so skip the match mask (fast path)
            pruned = self._maxscore(np.array(cols), k)
            if pruned is not None:
                return pruned
            out = np.zeros(self.n_rows, dtype=np.float64)
            for j in cols:
                a, b = sc.indptr[j], sc.indptr[j + 1]
                out[sc.indices[a:b]] += sc.data[a:b]
            rows, vals = top_k(out, k)
            keep = vals > 0
            return rows[keep], vals[keep]
        scores, hit = self.get_scores(query_tokens)
        return top_k(scores, k, np.flatnonzero(hit))

    def _col_max(self) -> np.ndarray:
        """(V,) largest score in each column (0 for empty columns), computed once per index."""
        if getattr(self, "_cmax", None) is None:
            sc = self.scores
            starts = sc.indptr[:-1]
            nonempty = np.diff(sc.indptr) > 0
            cmax = np.zeros(sc.shape[1])
            if nonempty.any():  # empty columns own no data, so consecutive non-empty starts bound each column
                cmax[nonempty] = np.maximum.reduceat(np.asarray(sc.data), starts[nonempty])
            self._cmax = cmax
        return self._cmax

    def _maxscore(self, cols: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact top-k scanning only rare-term columns, or None when the bound does not prove it."""
        sc, n = self.scores, self.n_rows
        lens = sc.indptr[cols + 1] - sc.indptr[cols]
        common = lens > self.cfg.prune_df_frac * n
        if common.all() or not common.any() or not sc.has_sorted_indices:
            return None
        out = np.zeros(n, dtype=np.float64)
        for j in cols[~common]:  # essential (rare) terms: scatter as usual
            a, b = sc.indptr[j], sc.indptr[j + 1]
            out[sc.indices[a:b]] += sc.data[a:b]
        cand = np.flatnonzero(out)  # rows matching a rare term (all idf > 0 here)
        for j in cols[common]:  # common terms: look up only the candidate rows (sorted column indices)
            a, b = sc.indptr[j], sc.indptr[j + 1]
            col = sc.indices[a:b]
            pos = np.minimum(np.searchsorted(col, cand), len(col) - 1)
            found = col[pos] == cand
            out[cand[found]] += sc.data[a:b][pos[found]]
        rows, vals = top_k(out, k, cand)
        bound = self._col_max()[cols[common]].sum()  # best score a row without rare terms can reach
        if len(rows) == k and vals[-1] > bound:
            return rows, vals
        return None

    def save(self, d: Path) -> None:
        tf, sc = self.tf, self.scores
        arrays = (tf.indptr.astype(np.int64), tf.indices.astype(np.int32), tf.data.astype(np.int32))
        arrays += (sc.indptr.astype(np.int64), sc.indices.astype(np.int32), sc.data)
        for name, arr in zip(_FILES, arrays, strict=True):
            np.save(d / f"bm25_{name}.npy", arr, allow_pickle=False)
        terms = [""] * len(self.vocab)
        for t, i in self.vocab.items():
            terms[i] = t
        meta = {"config": asdict(self.cfg), "shape": list(tf.shape), "terms": terms}
        (d / "bm25_vocab.json").write_text(json.dumps(meta, ensure_ascii=False))

    @classmethod
    def load(cls, d: Path, mmap: bool = True) -> BM25Index:
        sp = _sparse()
        try:
            meta = json.loads((d / "bm25_vocab.json").read_text())
            a = {n: np.load(d / f"bm25_{n}.npy", mmap_mode="r" if mmap else None) for n in _FILES}
            shape = tuple(meta["shape"])
            self = cls.__new__(cls)
            self.cfg = BM25Config(**meta["config"])
            self.vocab = {t: i for i, t in enumerate(meta["terms"])}
            self.tf = sp.csr_matrix((a["tf_data"], a["tf_indices"], a["tf_indptr"]), shape=shape)
            self.scores = sp.csc_matrix((a["sc_data"], a["sc_indices"], a["sc_indptr"]), shape=shape)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CorruptIndexError(f"cannot load BM25 index files in {d}: {e}") from e
        if len(self.vocab) != shape[1] or self.scores.nnz != self.tf.nnz:
            raise CorruptIndexError(f"BM25 files in {d} disagree (vocab/tf/score sizes)")
        return self


def top_k(scores: np.ndarray, k: int, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest ``scores`` (ties: lower index first), restricted to candidates."""
    idx = np.arange(len(scores)) if candidates is None else candidates
    if len(idx) > k:
        s = scores[idx]
        thr = s[np.argpartition(-s, k - 1)[k - 1]]  # k-th largest value
        above = idx[s > thr]
        idx = np.concatenate([above, idx[s == thr][: k - len(above)]])  # ties: lowest indices
    order = np.lexsort((idx, -scores[idx]))
    idx = idx[order]
    return idx, scores[idx]
