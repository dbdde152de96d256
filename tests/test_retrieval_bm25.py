"""BM25: parity with rank-bm25's BM25Okapi (same tokens, k1/b/epsilon), incremental add/delete, tokenizer."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from retrieval.bm25 import BM25Config, BM25Index, bm25_idf, top_k
from retrieval.tokenize import tokenize


def _corpus(seed: int, n_docs: int = 60) -> list[list[str]]:
    """Zipf-ish token lists: frequent words appear in > half the docs (negative idf -> epsilon floor)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(80)]
    weights = [1.0 / (i + 1) for i in range(80)]
    docs = [rng.choices(vocab, weights, k=rng.randint(1, 40)) for _ in range(n_docs)]
    docs[3] = []  # an empty chunk (e.g. only punctuation) is legal in both
    return docs


def _doc_freqs(docs: list[list[str]]) -> dict[str, int]:
    df: dict[str, int] = {}
    for d in docs:
        for t in set(d):
            df[t] = df.get(t, 0) + 1
    return df


QUERIES = [["w0"], ["w1", "w5", "w5"], ["w79", "nope"], ["w2", "w3", "w40", "w0"], ["unknown"]]


@pytest.mark.parametrize("k1,b,eps", [(1.5, 0.75, 0.25), (1.2, 0.5, 0.1), (2.0, 0.9, 0.0)])
def test_scores_equal_rank_bm25(k1: float, b: float, eps: float) -> None:
    docs = _corpus(0)
    ref = BM25Okapi(docs, k1=k1, b=b, epsilon=eps)
    n_floor = sum(np.log(60 - f + 0.5) < np.log(f + 0.5) for f in _doc_freqs(docs).values())
    assert n_floor > 0, "corpus must exercise the negative-idf epsilon floor"
    ours = BM25Index.empty(BM25Config(k1=k1, b=b, epsilon=eps)).add(docs)
    for q in QUERIES:
        got, _ = ours.get_scores(q)
        np.testing.assert_allclose(got, ref.get_scores(q), rtol=0, atol=1e-6)


def test_empty_chunk_with_b1_scores_zero_where_rank_bm25_gives_nan() -> None:
    """Known difference: with b=1 rank-bm25 computes 0/0 for a zero-length document; we store no entry (0)."""
    docs = _corpus(0)
    ref = BM25Okapi(docs, b=1.0).get_scores(["w0"])
    got, hit = BM25Index.empty(BM25Config(b=1.0)).add(docs).get_scores(["w0"])
    assert np.isnan(ref[3]) and got[3] == 0.0 and not hit[3]
    ok = np.arange(len(docs)) != 3
    np.testing.assert_allclose(got[ok], ref[ok], atol=1e-6)


def test_idf_floor_matches_rank_bm25() -> None:
    docs = _corpus(1)
    ref = BM25Okapi(docs)
    ours = BM25Index.empty().add(docs)
    df = np.bincount(ours.tf.indices, minlength=len(ours.vocab))
    idf = bm25_idf(df, len(docs), 0.25)
    assert any(ref.idf[t] == pytest.approx(0.25 * ref.average_idf) for t in ref.idf), "no floored term"
    for t, j in ours.vocab.items():
        assert idf[j] == pytest.approx(ref.idf[t], abs=1e-12), t


def test_incremental_add_delete_equals_fresh_build() -> None:
    docs = _corpus(2, 80)
    ix = BM25Index.empty().add(docs[:30]).add(docs[30:50]).add(docs[50:])
    keep = np.ones(len(docs), dtype=bool)
    keep[[0, 7, 33, 79]] = False
    ix = ix.keep_rows(keep)
    kept = [d for d, kk in zip(docs, keep, strict=True) if kk]
    ref = BM25Okapi(kept)
    for q in QUERIES:
        got, _ = ix.get_scores(q)
        np.testing.assert_allclose(got, ref.get_scores(q), rtol=0, atol=1e-6)


def test_delete_drops_terms_from_mean_idf() -> None:
    """Terms of deleted rows must not linger in the epsilon floor's mean idf."""
    docs = [["a", "b"], ["a", "c"], ["a", "rare1", "rare2"], ["a"]]
    ix = BM25Index.empty().add(docs).keep_rows(np.array([True, True, False, True]))
    ref = BM25Okapi([docs[0], docs[1], docs[3]])
    got, _ = ix.get_scores(["a", "b"])
    np.testing.assert_allclose(got, ref.get_scores(["a", "b"]), atol=1e-9)


def test_save_load_roundtrip(tmp_path) -> None:
    docs = _corpus(3)
    ix = BM25Index.empty(BM25Config(k1=1.3)).add(docs)
    ix.save(tmp_path)
    back = BM25Index.load(tmp_path)
    assert back.cfg == ix.cfg
    for q in QUERIES:
        np.testing.assert_array_equal(back.get_scores(q)[0], ix.get_scores(q)[0])


def test_top_k_matches_stable_argsort() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=300).astype(float)  # many ties
    for k in (1, 7, 50, 300):
        idx, vals = top_k(scores, k)
        ref = np.lexsort((np.arange(300), -scores))[:k]
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_array_equal(vals, scores[ref])


def test_search_ranks_match_rank_bm25_on_real_text() -> None:
    texts = [
        "Invoice INV-2024-001 was paid on 2024-03-07 by ACME Corp.",
        "The X-ray machine in room 7 is broken; call ext. 4412.",
        "def get_user_name(user_id): return db.users[user_id].name",
        "UUID 123e4567-e89b-12d3-a456-426614174000 belongs to order A7.",
        "The quick brown fox jumps over the lazy dog.",
        "Room 12 has a working X-ray machine.",
    ]
    toks = [tokenize(t) for t in texts]
    ref = BM25Okapi(toks)
    ix = BM25Index.empty().add_texts(texts)
    for q in ["INV-2024-001", "x-ray room 7", "get_user_name", "123e4567-e89b-12d3-a456-426614174000", "a7"]:
        qt = tokenize(q)
        np.testing.assert_allclose(ix.get_scores(qt)[0], ref.get_scores(qt), atol=1e-6)
    rows, _ = ix.search("123e4567-e89b-12d3-a456-426614174000", k=1)
    assert rows[0] == 3


def test_tokenizer_keeps_lookup_tokens() -> None:
    toks = tokenize("Invoice A7: code 7 is 42, X-ray v2.3.1 get_user_name getUserName 1,000 café")
    for t in ["a7", "7", "42", "x-ray", "x", "ray", "v2.3.1", "get_user_name", "user", "getusername"]:
        assert t in toks, t
    assert "1,000" in toks and "cafe" not in toks and "café" in toks
    assert tokenize("THE The the") == ["the"] * 3
    uuid = "123E4567-E89B-12D3-A456-426614174000"
    assert uuid.lower() in tokenize(f"id={uuid}.")


def test_search_fast_path_equals_masked_path() -> None:
    """search_tokens' fast path (all idf > 0) and masked path (a floored term) agree with brute force."""
    docs = _corpus(4, 200)
    for eps, q in itertools.product((0.25, 0.0), (["w60", "w70"], ["w0", "w60"], ["w0"], ["nope"])):
        ix, ref = BM25Index.empty(BM25Config(epsilon=eps)).add(docs), BM25Okapi(docs, epsilon=eps)
        s = ref.get_scores(q)
        matched = np.array([any(t in d for t in q) for d in docs])
        want = [i for i in np.lexsort((np.arange(len(docs)), -s)) if matched[i]][:10]
        rows, vals = ix.search_tokens(q, 10)
        assert list(rows) == want, q
        np.testing.assert_allclose(vals, s[want], atol=1e-6)


def test_maxscore_pruning_is_exact() -> None:
    """Pruned top-k (common terms looked up only for rare-term rows) equals the rank-bm25 brute force."""
    rng = random.Random(5)
    docs = _corpus(5, 400)
    for i in rng.sample(range(400), 12):
        docs[i] = docs[i] + ["needle-key", "rare"]
    ref = BM25Okapi(docs)
    pruned = BM25Index.empty(BM25Config(prune_df_frac=0.05)).add(docs)
    full = BM25Index.empty(BM25Config(prune_df_frac=2.0)).add(docs)  # never prunes
    n_pruned = 0
    for q in (["w0", "w1", "needle-key"], ["rare", "w2", "w3", "w0"], ["w1", "rare", "w70"], ["w0", "w1"]):
        s = ref.get_scores(q)
        for k in (1, 5, 30):
            n_pruned += pruned._maxscore(np.array([pruned.vocab[t] for t in q]), k) is not None
            want = np.lexsort((np.arange(len(docs)), -s))[:k]
            for ix in (pruned, full):
                rows, vals = ix.search_tokens(q, k)
                np.testing.assert_allclose(vals, s[want], atol=1e-9)
                assert set(rows[vals > s[want][-1] + 1e-9]) <= set(want), q
    assert n_pruned >= 3, "the pruned path must actually be exercised"
