"""Retrieval benchmark: BM25 speed vs rank-bm25, BM25 at 1M chunks, dense encode/FAISS speed, needle recall.

    nice python -m eval.bench_retrieval --corpus ../shared/data/corpus/gutenberg-top100-authors.tar.xz \\
        --ruler ../shared/data/ruler --n-large 1000000 --n-small 100000

Haystack = chunks of the Gutenberg books (chunker, overlap 0), cycled with a pass counter if the books run
out. Needles (RULER niah style) "One of the special magic numbers for {adj}-{noun} is: {7 digits}." are
appended to random chunks; lexical queries ask "What is the special magic number for {adj}-{noun}?",
dense queries paraphrase ("Which secret figure belongs to the {adj} {noun}?"). Writes JSON to eval/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from eval.common import RESULTS_DIR, run_metadata, write_results
from retrieval.bm25 import BM25Index
from retrieval.chunker import ChunkerConfig, iter_chunks
from retrieval.tokenize import tokenize

log = logging.getLogger("bench_retrieval")

NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUERY = "What is the special magic number for {key}?"
PARAPHRASE = "Which secret figure belongs to the {words}?"


def book_texts(corpus: Path) -> Iterator[str]:
    with tarfile.open(corpus, "r:xz") as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".txt"):
                yield tar.extractfile(m).read().decode("utf-8", errors="replace")


def haystack(corpus: Path, n: int, max_tokens: int) -> list[str]:
    """``n`` chunk texts from the corpus (books re-read with a pass tag if they run out)."""
    cfg = ChunkerConfig(max_tokens=max_tokens, overlap_tokens=0)
    out: list[str] = []
    rep = 0
    while len(out) < n:
        for i, text in enumerate(book_texts(corpus)):
            for c in iter_chunks(f"b{i}", [text], cfg):
                out.append(c.text if rep == 0 else f"{c.text} (pass {rep})")
                if len(out) == n:
                    return out
        rep += 1
    return out


def needles(ruler: Path | None, n: int, seed: int) -> list[tuple[str, str, str]]:
    """(key, value, words) per needle; keys adjective-noun from the RULER word lists when present."""
    rng = random.Random(seed)
    wl = ruler / "wonderwords_3.0.1" if ruler else None
    if wl and (wl / "nounlist.txt").exists():
        adjs = (wl / "adjectivelist.txt").read_text().split()
        nouns = (wl / "nounlist.txt").read_text().split()
    else:
        log.warning("RULER word lists not found: synthetic keys")
        adjs, nouns = [f"adj{i}" for i in range(900)], [f"noun{i}" for i in range(6000)]
    keys = set()
    while len(keys) < n:
        keys.add((rng.choice(adjs), rng.choice(nouns)))
    return [(f"{a}-{b}", str(rng.randrange(10**6, 10**7)), f"{a} {b}") for a, b in sorted(keys)]


def plant(chunks: list[str], items: list[tuple[str, str, str]], seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(chunks), size=len(items), replace=False)
    for r, (key, value, _) in zip(rows, items, strict=True):
        chunks[r] = f"{chunks[r]} {NEEDLE.format(key=key, value=value)}"
    return [int(r) for r in rows]


def p50_ms(times: list[float]) -> float:
    return float(np.median(times) * 1000)


def bench_bm25_vs_rank_bm25(chunks: list[str], queries: list[str], n_ref_queries: int) -> dict:
    from rank_bm25 import BM25Okapi

    t = time.perf_counter()
    ours = BM25Index.empty().add_texts(chunks)
    build_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = BM25Okapi([tokenize(c) for c in chunks])
    build_ref = time.perf_counter() - t
    t_ours, t_ref, max_diff = [], [], 0.0
    for q in queries:
        t = time.perf_counter()
        ours.search(q, 5)  # includes query tokenization
        t_ours.append(time.perf_counter() - t)
    for q in queries[:n_ref_queries]:
        toks = tokenize(q)
        t = time.perf_counter()
        s = ref.get_scores(toks)
        np.argsort(s)[::-1][:5]  # rank-bm25's get_top_n ranking step
        t_ref.append(time.perf_counter() - t)
        max_diff = max(max_diff, float(np.abs(ours.get_scores(toks)[0] - s).max()))
    return {
        "n_chunks": len(chunks),
        "build_s": {"ours": build_ours, "rank_bm25": build_ref},
        "query_p50_ms": {"ours": p50_ms(t_ours), "rank_bm25": p50_ms(t_ref)},
        "n_queries": {"ours": len(t_ours), "rank_bm25": len(t_ref)},
        "speedup_p50": p50_ms(t_ref) / p50_ms(t_ours),
        "max_abs_score_diff": max_diff,
    }


def bench_bm25_large(chunks: list[str], items, rows: list[int], extra_queries: list[str]) -> dict:
    t = time.perf_counter()
    ix = BM25Index.empty().add_texts(chunks)
    build = time.perf_counter() - t
    hits, times = 0, []
    for (key, _, _), row in zip(items, rows, strict=True):
        t = time.perf_counter()
        got, _ = ix.search(QUERY.format(key=key), 5)
        times.append(time.perf_counter() - t)
        hits += row in got
    t_free = []
    for q in extra_queries:
        t = time.perf_counter()
        ix.search(q, 5)
        t_free.append(time.perf_counter() - t)
    return {
        "n_chunks": len(chunks),
        "build_s": build,
        "nnz": int(ix.scores.nnz),
        "vocab": len(ix.vocab),
        "needle_query_p50_ms": p50_ms(times),
        "needle_query_p95_ms": float(np.percentile(times, 95) * 1000),
        "text_query_p50_ms": p50_ms(t_free),
        "needle_recall_at_5": hits / len(items),
        "n_needles": len(items),
    }


def bench_dense(chunks: list[str], n_encode: int, n_faiss: int, dense_hay: int, items, seed: int) -> dict:
    from retrieval.dense import DenseConfig, DenseIndex
    from retrieval.embedder import Embedder

    emb = Embedder.default()
    sample = chunks[:n_encode]
    emb.encode(sample[:64])  # warm-up
    t = time.perf_counter()
    emb.encode(sample)
    enc_s = time.perf_counter() - t
    # FAISS flat search at n_faiss random unit vectors (not encoded: encoding 1M chunks on CPU takes hours)
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n_faiss, emb.dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    t = time.perf_counter()
    ix = DenseIndex(DenseConfig(backend="faiss"), emb.dim, v, np.arange(n_faiss))
    add_s = time.perf_counter() - t
    qs = emb.encode([QUERY.format(key=k) for k, _, _ in items[:30]])
    p50 = {}
    for threads in (1, 0):  # default (1 FAISS thread) vs all cores
        ix.cfg = DenseConfig(backend="faiss", faiss_threads=threads)
        times = []
        for q in qs:
            t = time.perf_counter()
            ix.search(q[None], 5)
            times.append(time.perf_counter() - t)
        p50[f"threads_{threads or 'all'}"] = p50_ms(times)
    ix.cfg = DenseConfig()
    del ix, v
    recall = dense_needle_recall(emb, chunks[:dense_hay], items, seed)
    return {
        "device": emb.device,
        "encode_chunks_per_s": n_encode / enc_s,
        "n_encoded": n_encode,
        "faiss_flat_ip": {
            "n_vectors": n_faiss,
            "vectors": "random unit",
            "add_s": add_s,
            "search_p50_ms": p50,
        },
        **recall,
    }


def dense_needle_recall(emb, hay: list[str], items, seed: int) -> dict:
    """Dense and hybrid recall@5 of paraphrased needle queries in an encoded haystack of len(hay) chunks."""
    import tempfile

    from retrieval import Index

    hay = list(hay)
    rows = plant(hay, items, seed + 1)
    with tempfile.TemporaryDirectory() as d:
        idx = Index.create(Path(d) / "s", embedder=emb, config=None)
        t = time.perf_counter()
        idx.add([(f"c{i}", text) for i, text in enumerate(hay)])
        ingest_s = time.perf_counter() - t
        out = {"dense_haystack_chunks": len(hay), "dense_ingest_s": ingest_s}
        leaders = idx.config.rrf_leaders
        # hybrid_plain_rrf: the same index with plain RRF (no leaders), the baseline of the fusion rule
        for mode in ("dense", "hybrid", "hybrid_plain_rrf", "bm25"):
            idx.config.rrf_leaders = 0 if mode == "hybrid_plain_rrf" else leaders
            hits = {1: 0, 3: 0, 5: 0}
            for (_, _, words), row in zip(items, rows, strict=True):
                found = idx.search(PARAPHRASE.format(words=words), k=5, mode=mode.split("_")[0])
                ids = [h.chunk.doc_id for h in found]
                for k in hits:
                    hits[k] += f"c{row}" in ids[:k]
            for k, n in hits.items():
                out[f"paraphrase_recall_at_{k}_{mode}"] = n / len(items)
        idx.config.rrf_leaders = leaders
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True, help="gutenberg-top100-authors.tar.xz")
    ap.add_argument("--ruler", type=Path, default=None, help="dir with wonderwords_3.0.1/ word lists")
    ap.add_argument("--n-small", type=int, default=100_000, help="chunks for the rank-bm25 comparison")
    ap.add_argument("--n-large", type=int, default=1_000_000, help="chunks for the large BM25 run")
    ap.add_argument("--chunk-tokens", type=int, default=64, help="chunk size in lexical tokens")
    ap.add_argument("--n-needles", type=int, default=200, help="needles planted in the large haystack")
    ap.add_argument("--n-queries", type=int, default=200, help="text queries timed for BM25")
    ap.add_argument("--n-ref-queries", type=int, default=20, help="queries timed for rank-bm25 (slow)")
    ap.add_argument("--n-encode", type=int, default=1000, help="chunks encoded for throughput")
    ap.add_argument("--n-faiss", type=int, default=1_000_000, help="vectors in the FAISS search timing")
    ap.add_argument("--dense-haystack", type=int, default=5000, help="encoded chunks for dense needle recall")
    ap.add_argument("--n-dense-needles", type=int, default=50)
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument(
        "--skip-bm25", action="store_true", help="only the dense part; keep BM25 results of --out"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_retrieval")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rng = random.Random(args.seed)
    res = run_metadata(config=vars(args) | {"corpus": str(args.corpus)}, seed=args.seed)
    res["loadavg_at_start"] = os.getloadavg()  # the 2-core box is shared: contention inflates timings
    if args.skip_bm25:  # re-run only the dense part, keeping the BM25 sections of the previous results
        prev = json.loads((RESULTS_DIR / f"{args.out}.json").read_text())
        res |= {k: prev[k] for k in ("bm25_small", "bm25_large") if k in prev}
        res["bm25_from_run"] = {k: prev.get(k) for k in ("timestamp", "git_sha", "loadavg_at_start")}
        res["dense"] = bench_dense(
            haystack(args.corpus, args.dense_haystack, args.chunk_tokens),
            args.n_encode,
            args.n_faiss,
            args.dense_haystack,
            needles(args.ruler, args.n_needles, args.seed)[: args.n_dense_needles],
            args.seed,
        )
        res["loadavg_at_end"] = os.getloadavg()
        write_results(args.out, res)
        return
    t = time.perf_counter()
    chunks = haystack(args.corpus, max(args.n_large, args.n_small), args.chunk_tokens)
    log.info("haystack: %d chunks in %.1fs", len(chunks), time.perf_counter() - t)
    queries = [
        " ".join(rng.sample(tokenize(c), min(6, len(tokenize(c)))))
        for c in rng.sample(chunks, args.n_queries)
    ]
    res["bm25_small"] = bench_bm25_vs_rank_bm25(chunks[: args.n_small], queries, args.n_ref_queries)
    log.info("bm25 vs rank-bm25: %s", res["bm25_small"])
    items = needles(args.ruler, args.n_needles, args.seed)
    large = chunks[: args.n_large]
    rows = plant(large, items, args.seed)
    res["bm25_large"] = bench_bm25_large(large, items, rows, queries)
    log.info("bm25 large: %s", res["bm25_large"])
    write_results(args.out, res)
    if not args.skip_dense:
        del large
        clean = haystack(args.corpus, args.dense_haystack, args.chunk_tokens)
        res["dense"] = bench_dense(
            clean, args.n_encode, args.n_faiss, args.dense_haystack, items[: args.n_dense_needles], args.seed
        )
        log.info("dense: %s", res["dense"])
    res["loadavg_at_end"] = os.getloadavg()
    write_results(args.out, res)


if __name__ == "__main__":
    main()
