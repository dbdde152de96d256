"""Dense index without faiss: the exact torch/numpy flat search must equal faiss.IndexFlatIP, and a store
written without faiss must search the same and reopen in a process that has faiss.

Run: .venv/bin/python -m pytest -q tests/test_retrieval_dense_fallback.py
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from retrieval import Index
from retrieval import dense as dense_mod
from retrieval.dense import DenseConfig, DenseIndex, _numpy_topk

faiss = pytest.importorskip("faiss")

DOCS = [
    ("cats", "The cat sat on the warm mat. Kittens like to sleep in the afternoon sun."),
    ("bread", "A recipe for bread needs flour, water, salt and yeast; knead it and let it rise."),
    ("mars", "The spacecraft entered orbit around Mars after a seven month cruise."),
    ("rain", "Heavy rain flooded the streets of the old town overnight."),
]


@pytest.fixture
def no_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import faiss`` fail for this test and reset the module's cached availability check."""
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setattr(dense_mod, "_HAS_FAISS", [])
    assert not dense_mod.faiss_available()


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _faiss_flat_ip(v: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ix = faiss.IndexIDMap(faiss.IndexFlatIP(v.shape[1]))
    ix.add_with_ids(v, ids)
    scores, got = ix.search(q, k)
    return got, scores


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_fallback_equals_faiss_flat_ip(no_faiss: None, kind: str) -> None:
    v, q = _unit(1500, 32, 0), _unit(16, 32, 1)
    ids = np.random.default_rng(2).permutation(10**6)[:1500].astype(np.int64)
    ix = DenseIndex(DenseConfig(kind=kind, device="cpu"), 32, v[:900], ids[:900]).add(v[900:], ids[900:])
    keep = np.random.default_rng(3).random(1500) > 0.25
    ix = ix.keep_rows(keep)
    assert ix.index is None, "without faiss no faiss index object may be built"
    rows, scores = ix.search(q, 10)
    ref_ids, ref_scores = _faiss_flat_ip(v[keep], ids[keep], q, 10)
    np.testing.assert_array_equal(ix.ids[rows], ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_numpy_topk_equals_faiss_and_pads(no_faiss: None) -> None:
    v, q = _unit(300, 24, 4), _unit(5, 24, 5)
    rows, scores = _numpy_topk(q, v, 7)
    ref_ids, ref_scores = _faiss_flat_ip(v, np.arange(300, dtype=np.int64), q, 7)
    np.testing.assert_array_equal(rows, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    small = DenseIndex(DenseConfig(device="cpu"), 24, v[:3], np.arange(3)).search(q, 5)  # k > N
    assert (small[0][:, 3:] == -1).all() and np.isinf(small[1][:, 3:]).all()


class _HashEmbedder:
    """A deterministic bag-of-words embedder (dim 64) so the store test needs no model download or load."""

    dim, name = 64, "hash-bow"

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", " ").replace(",", " ").split():
                out[i, sum(map(ord, w)) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_store_written_without_faiss_searches_and_reopens_with_faiss(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    emb = _HashEmbedder()
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setattr(dense_mod, "_HAS_FAISS", [])
    idx = Index.create(tmp_path / "s", embedder=emb)
    idx.add(DOCS)
    vdir = tmp_path / "s" / idx._manifest["dir"]
    assert not (vdir / "dense.faiss").exists(), "no faiss file may be written without faiss"
    query = "flour water salt yeast"
    hits = idx.search(query, k=4, mode="dense")
    assert hits[0].chunk.doc_id == "bread"
    ref = np.array([float(emb.encode([c.text])[0] @ emb.encode([query])[0]) for c in (h.chunk for h in hits)])
    np.testing.assert_allclose([h.score for h in hits], ref, atol=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    hybrid = Index.open(tmp_path / "s", embedder=emb).search("kittens sleep", k=2, mode="hybrid")
    assert hybrid[0].chunk.doc_id == "cats"

    # faiss importable again (the same module object: re-importing faiss would wrap its classes twice)
    monkeypatch.setitem(sys.modules, "faiss", faiss)
    monkeypatch.setattr(dense_mod, "_HAS_FAISS", [])
    back = Index.open(tmp_path / "s", embedder=emb)
    assert back._state.dense.index is not None
    again = back.search(query, k=4, mode="dense")
    assert [h.chunk.id for h in again] == [h.chunk.id for h in hits]
    np.testing.assert_allclose([h.score for h in again], [h.score for h in hits], atol=1e-5)
