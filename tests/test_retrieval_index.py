"""Index: add/update/delete semantics, save -> load identity, fusion, bad input, corrupt files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rank_bm25 import BM25Okapi
from retrieval_helpers import HashEmbedder

import retrieval.index as index_mod
from retrieval import (
    CorruptIndexError,
    DenseUnavailableError,
    DuplicateDocumentError,
    EmptyDocumentError,
    EmptyQueryError,
    Index,
    IndexConfig,
    IndexExistsError,
    IndexNotFoundError,
    InvalidDocumentIdError,
    InvalidInputError,
    InvalidUTF8Error,
    QueryTooLongError,
    UnknownModeError,
)
from retrieval.chunker import ChunkerConfig
from retrieval.dense import DenseConfig
from retrieval.fusion import rrf
from retrieval.tokenize import tokenize

DOCS = [
    ("inv", "Invoice INV-2024-001 was paid on 2024-03-07. The amount was 1,250 euros."),
    ("xray", "The X-ray machine in room 7 is broken. Call extension 4412 for repairs."),
    ("code", "def get_user_name(user_id): return db.users[user_id].name  # helper"),
    ("fox", "The quick brown fox jumps over the lazy dog. The dog sleeps all day."),
    ("cat", "A cat sat on the mat. The cat likes the warm sun on the mat."),
    ("uuid", "Order 123e4567-e89b-12d3-a456-426614174000 shipped to Berlin on Monday."),
]
QUERIES = [
    "INV-2024-001",
    "room 7 x-ray",
    "get_user_name",
    "lazy dog",
    "warm cat",
    "123e4567",
    "berlin order",
]


def _cfg(**kw) -> IndexConfig:
    return IndexConfig(chunker=ChunkerConfig(max_tokens=12, overlap_tokens=3), **kw)


@pytest.fixture()
def idx(tmp_path) -> Index:
    ix = Index.create(tmp_path / "store", config=_cfg(), embedder=HashEmbedder())
    ix.add(DOCS)
    return ix


def _dump(hits) -> list[tuple]:
    return [(h.chunk, h.score, h.scores) for h in hits]


def test_bm25_mode_equals_rank_bm25_over_chunks(idx: Index) -> None:
    chunks = [c for d, _ in DOCS for c in idx.chunks(d)]
    ref = BM25Okapi([tokenize(c.text) for c in chunks])
    for q in QUERIES:
        scores = ref.get_scores(tokenize(q))
        hits = idx.search(q, k=3, mode="bm25")
        want = np.lexsort((np.arange(len(chunks)), -scores))[: len(hits)]
        assert [h.chunk.id for h in hits] == [chunks[i].id for i in want], q
        np.testing.assert_allclose([h.score for h in hits], scores[want], atol=1e-6)


def test_hybrid_is_weighted_rrf_of_both_rankings(idx: Index) -> None:
    q = "lazy dog in the sun"
    bm = idx.search(q, k=100, mode="bm25")
    de = idx.search(q, k=100, mode="dense")
    ids = {h.chunk.id: h for h in bm + de}
    id_of = sorted(ids)
    ranks = {"bm25": [id_of.index(h.chunk.id) for h in bm], "dense": [id_of.index(h.chunk.id) for h in de]}
    ref = rrf(ranks, {"bm25": 2.0, "dense": 0.5}, k=60, leaders=idx.config.rrf_leaders)[:4]
    hits = idx.search(q, k=4, mode="hybrid", weights={"bm25": 2.0, "dense": 0.5})
    assert [h.chunk.id for h in hits] == [id_of[i] for i, _ in ref]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in ref], rtol=1e-12)
    by_id = {h.chunk.id: h for h in bm}
    for h in hits:  # raw per-retriever scores are reported for every fused hit
        assert h.scores["bm25"] == pytest.approx(
            by_id[h.chunk.id].scores["bm25"] if h.chunk.id in by_id else 0.0
        )
        assert h.scores["dense"] == pytest.approx(
            float(HashEmbedder().encode([h.chunk.text])[0] @ HashEmbedder().encode([q])[0]), abs=1e-5
        )


def test_rrf_formula_by_hand() -> None:
    fused = dict(rrf({"a": [1, 2, 3], "b": [3, 1]}, {"a": 1.0, "b": 2.0}, k=60))
    assert fused[1] == pytest.approx(1 / 61 + 2 / 62)
    assert fused[3] == pytest.approx(1 / 63 + 2 / 61)
    assert fused[2] == pytest.approx(1 / 62)


def test_rrf_leaders_come_first_and_keep_their_scores() -> None:
    # item 9 is dense rank 1 only; items 1, 2 sit at ranks 2-3 of both lists: plain RRF ranks 9 last
    ranks = {"bm25": [0, 1, 2], "dense": [9, 2, 1]}
    plain = rrf(ranks, k=60)
    assert [i for i, _ in plain] == [1, 2, 0, 9]
    led = rrf(ranks, k=60, leaders=1)
    assert [i for i, _ in led] == [0, 9, 1, 2]  # both leaders first, by score (1/61 each: tie -> by id)
    assert dict(led) == dict(plain)
    # a retriever of weight 0 promotes nothing
    assert [i for i, _ in rrf(ranks, {"dense": 0.0}, k=60, leaders=1)] == [0, 1, 2, 9]


def test_save_load_identical_results(idx: Index) -> None:
    back = Index.open(idx.store_dir, embedder=HashEmbedder())
    assert back.version == idx.version and back.documents() == idx.documents()
    for mode in ("bm25", "dense", "hybrid"):
        for q in QUERIES:
            assert _dump(back.search(q, k=4, mode=mode)) == _dump(idx.search(q, k=4, mode=mode)), (mode, q)


def test_add_update_delete_semantics(idx: Index) -> None:
    v0 = idx.version
    n_fox = len(idx.chunks("fox"))
    assert idx.add([("fox", DOCS[3][1])]) == [c.id for c in idx.chunks("fox")] and idx.version == v0, (
        "re-adding identical content must be a no-op"
    )
    new_ids = idx.add([("fox", "A red fox hunts mice in the snowy field at dawn.")])
    assert idx.version == v0 + 1 and len(idx) != 0
    assert [c.id for c in idx.chunks("fox")] == new_ids and new_ids[0].startswith("fox#")
    assert not idx.search("lazy dog jumps", k=5, mode="bm25") or all(
        "lazy" not in h.chunk.text for h in idx.search("lazy", k=5, mode="bm25")
    )
    assert idx.search("snowy field", k=1, mode="bm25")[0].chunk.doc_id == "fox"
    assert idx.delete(["cat", "missing"]) == 1
    assert "cat" not in idx.documents() and list(idx.documents()) == ["inv", "xray", "code", "uuid", "fox"]
    assert all(h.chunk.doc_id != "cat" for h in idx.search("cat mat", k=10, mode="hybrid"))
    # the committed store agrees, and BM25 statistics equal a fresh index of the remaining docs
    fresh = Index.create(idx.store_dir.parent / "fresh", config=_cfg(), embedder=HashEmbedder())
    fresh.add(
        [(d, t) for d, t in DOCS if d not in ("cat", "fox")]
        + [("fox", "A red fox hunts mice in the snowy field at dawn.")]
    )
    back = Index.open(idx.store_dir, embedder=HashEmbedder())
    for q in QUERIES:
        assert _dump(back.search(q, k=5, mode="bm25")) == _dump(fresh.search(q, k=5, mode="bm25"))
    assert n_fox >= 1


def test_bad_input_raises_and_keeps_store(idx: Index) -> None:
    before = (idx.version, idx.documents())
    bad = [
        ([("a", "")], EmptyDocumentError),
        ([("a", "   \n")], EmptyDocumentError),
        ([("a", b"\xff\xfe bad")], InvalidUTF8Error),
        ([("a", "lone \udcff surrogate")], InvalidUTF8Error),
        ([("a", "x"), ("a", "y")], DuplicateDocumentError),
        ([("", "x")], InvalidDocumentIdError),
        ([(3, "x")], InvalidDocumentIdError),
        ("just a string", InvalidInputError),
        ([("ok", "fine text"), ("b", "")], EmptyDocumentError),  # valid docs before a bad one: none stored
    ]
    for docs, exc in bad:
        with pytest.raises(exc):
            idx.add(docs)
    assert (idx.version, idx.documents()) == before and "ok" not in idx.documents()
    for q, exc in [("", EmptyQueryError), ("  ", EmptyQueryError), ("x" * 5000, QueryTooLongError)]:
        with pytest.raises(exc):
            idx.search(q)
    with pytest.raises(UnknownModeError, match="hybrid"):
        idx.search("cat", mode="fuzzy")
    with pytest.raises(InvalidInputError, match="k must be"):
        idx.search("cat", k=0)
    assert idx.add([("b", b"valid now")]) and idx.search("valid", mode="bm25")[0].chunk.doc_id == "b"


def test_bm25_only_index_never_loads_embedder(tmp_path, monkeypatch) -> None:
    def boom():
        raise AssertionError("embedder must not load for dense=False")

    monkeypatch.setattr(index_mod, "_default_embedder", boom)
    ix = Index.create(tmp_path / "s", dense=False)
    ix.add(DOCS)
    assert ix.search("INV-2024-001", mode="hybrid")[0].chunk.doc_id == "inv"
    back = Index.open(tmp_path / "s")
    assert back.search("4412", mode="bm25")[0].chunk.doc_id == "xray"
    with pytest.raises(DenseUnavailableError):
        back.search("x", mode="dense")
    with pytest.raises(DenseUnavailableError, match="no embedder"):
        back.embed(["x"])
    assert not any(p.name.startswith("dense") for p in (tmp_path / "s").rglob("*"))


def test_open_missing_and_corrupt(tmp_path, idx: Index) -> None:
    with pytest.raises(IndexNotFoundError):
        Index.open(tmp_path / "nothing")
    with pytest.raises(IndexExistsError):
        Index.create(idx.store_dir, embedder=HashEmbedder())
    vdir = idx.store_dir / json.loads((idx.store_dir / "manifest.json").read_text())["dir"]
    f = vdir / "bm25_sc_data.npy"
    good = f.read_bytes()
    f.write_bytes(good[:-8])  # truncated
    with pytest.raises(CorruptIndexError, match="bm25_sc_data"):
        Index.open(idx.store_dir)
    f.write_bytes(good)
    assert Index.open(idx.store_dir, embedder=HashEmbedder()).documents() == idx.documents()
    (vdir / "chunks_text.bin").unlink()
    with pytest.raises(CorruptIndexError, match="chunks_text.bin"):
        Index.open(idx.store_dir)
    (idx.store_dir / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptIndexError, match="manifest"):
        Index.open(idx.store_dir)


def test_previous_version_stays_openable_and_memory_untouched(idx: Index) -> None:
    mem = idx.store_dir / "memory"
    mem.mkdir()
    (mem / "3.safetensors").write_bytes(b"owned by hybrid")
    v = idx.version
    idx.add([("new", "brand new document about zebras")])
    idx.delete(["new"])
    old = Index.open(idx.store_dir, version=v + 1, embedder=HashEmbedder())
    assert "new" in old.documents() and old.search("zebras", mode="bm25")[0].chunk.doc_id == "new"
    assert (mem / "3.safetensors").read_bytes() == b"owned by hybrid"


def test_hnsw_and_ivf_options(tmp_path) -> None:
    for kind in ("hnsw", "ivf"):
        cfg = _cfg(dense=DenseConfig(kind=kind, ivf_nlist=4, ivf_nprobe=4))
        ix = Index.create(tmp_path / kind, config=cfg, embedder=HashEmbedder())
        ix.add(DOCS)
        ix.delete(["cat"])
        flat = Index.create(tmp_path / f"flat-{kind}", config=_cfg(), embedder=HashEmbedder())
        flat.add([d for d in DOCS if d[0] != "cat"])
        for q in QUERIES:
            got, want = ix.search(q, k=3, mode="dense"), flat.search(q, k=3, mode="dense")
            assert got[0].chunk.id == want[0].chunk.id, (kind, q)
            # same scores in the same order (ids may swap only between exactly tied chunks)
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-6)
        back = Index.open(tmp_path / kind, embedder=HashEmbedder())
        assert _dump(back.search("lazy dog", mode="dense")) == _dump(ix.search("lazy dog", mode="dense"))
