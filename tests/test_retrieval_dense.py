"""Dense retrieval: MiniLM embedder vs a transformers reference, FAISS vs numpy brute force, GPU fallback."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import Index
from retrieval.dense import DenseConfig, DenseIndex
from retrieval.embedder import Embedder, default_model_dir

SENTS = [
    "The cat sat on the warm mat in the afternoon.",
    "Stock markets fell sharply after the central bank raised rates.",
    "A recipe for bread needs flour, water, salt and yeast.",
    "The spacecraft entered orbit around Mars after seven months.",
    "Invoice INV-2024-001 is due on the seventh of March.",
    "My laptop battery drains quickly when the screen is bright.",
    "The violinist played a sonata by Brahms at the concert.",
    "Heavy rain flooded the streets of the old town overnight.",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.default(device="cpu")


def test_embedder_matches_transformers_mean_pooling(embedder: Embedder) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    d = default_model_dir()
    tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).double().eval()
    batch = tok(SENTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state  # (B, T, 384)
    m = batch["attention_mask"].unsqueeze(-1).double()
    ref = (h * m).sum(1) / m.sum(1)
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    got = embedder.encode(SENTS)
    assert got.dtype == np.float32 and got.shape == (len(SENTS), 384) and embedder.dim == 384
    np.testing.assert_allclose(got, ref, atol=2e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _brute(q: np.ndarray, v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = q.astype(np.float64) @ v.astype(np.float64).T  # (Q, N) float64 reference
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sims, idx, 1)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_flat_search_equals_numpy_brute_force(backend: str) -> None:
    v, q = _unit(2000, 48, 0), _unit(20, 48, 1)
    ids = np.random.default_rng(2).permutation(10**6)[:2000].astype(np.int64)
    cfg = DenseConfig(backend=backend, device="cpu")
    ix = DenseIndex(cfg, 48, v[:1200], ids[:1200]).add(v[1200:], ids[1200:])
    keep = np.random.default_rng(3).random(2000) > 0.2
    ix = ix.keep_rows(keep)
    rows, scores = ix.search(q, 10)
    ref_rows, ref_scores = _brute(q, v[keep], 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    np.testing.assert_array_equal(ix.rows_of(ix.ids[rows[0]]), rows[0])


def test_faiss_on_real_embeddings_and_padding(embedder: Embedder, tmp_path) -> None:
    v = embedder.encode(SENTS)
    ix = DenseIndex(DenseConfig(), 384, v, np.arange(100, 100 + len(SENTS)))
    q = embedder.encode(["a kitten resting on a rug", "space probe reaches the red planet"])
    rows, scores = ix.search(q, 10)  # k > N: padded with -1
    ref_rows, ref_scores = _brute(q, v, len(SENTS))
    np.testing.assert_array_equal(rows[:, : len(SENTS)], ref_rows)
    assert (rows[:, len(SENTS) :] == -1).all() and list(ref_rows[:, 0]) == [0, 3]
    ix.save(tmp_path)
    back = DenseIndex.load(tmp_path, DenseConfig(), 384)
    np.testing.assert_array_equal(back.search(q, 5)[0], rows[:, :5])


def test_index_dense_and_hybrid_with_minilm(embedder: Embedder, tmp_path) -> None:
    idx = Index.create(tmp_path / "s", embedder=embedder)
    idx.add([(f"d{i}", s) for i, s in enumerate(SENTS)])
    assert idx.search("a kitten resting on a rug", k=1, mode="dense")[0].chunk.doc_id == "d0"
    assert idx.search("bread baking ingredients", k=1, mode="hybrid")[0].chunk.doc_id == "d2"
    assert idx.search("INV-2024-001", k=1, mode="bm25")[0].chunk.doc_id == "d4"
    hits = idx.search("violin concert", k=3, mode="hybrid")
    assert hits[0].chunk.doc_id == "d6" and set(hits[0].scores) == {"bm25", "dense"}
    qv = embedder.encode(["violin concert"])[0]
    assert hits[0].scores["dense"] == pytest.approx(float(embedder.encode([SENTS[6]])[0] @ qv), abs=1e-5)


@pytest.mark.gpu
def test_torch_cuda_backend_equals_cpu() -> None:
    v, q = _unit(5000, 384, 4), _unit(8, 384, 5)
    ids = np.arange(5000)
    gpu = DenseIndex(DenseConfig(backend="torch", device="cuda"), 384, v, ids).search(q, 10)
    cpu = DenseIndex(DenseConfig(backend="faiss"), 384, v, ids).search(q, 10)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_allclose(gpu[1], cpu[1], atol=1e-4)


@pytest.mark.gpu
def test_auto_backend_on_gpu_equals_brute_force() -> None:
    """On a GPU box 'auto' uses faiss-gpu or the torch matmul fallback; either must equal brute force."""
    v, q = _unit(3000, 64, 6), _unit(5, 64, 7)
    rows, scores = DenseIndex(DenseConfig(), 64, v, np.arange(3000)).search(q, 10)
    ref_rows, ref_scores = _brute(q, v, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
