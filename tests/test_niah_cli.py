"""NIAH runner + CLI: baselines that must solve S-NIAH-1, resumability, and the --quick outputs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from eval.niah.runner import RECORDS, RunConfig, run
from eval.niah.systems import SystemsConfig


def _cfg(out, seed=3, **kw):
    base = dict(tasks=["s-niah-1", "mk-niah-2"], systems=["regex", "bm25"], lengths=[600, 1200], depths=[0, 100],
                samples=1, seed=seed, out=str(out), progress=False, sys=SystemsConfig(max_new_tokens=4))  # fmt: skip
    return RunConfig(**(base | kw))


def test_baselines_and_resume(tmp_path):
    res = run(_cfg(tmp_path))
    recs = [json.loads(x) for x in (tmp_path / RECORDS).read_text().splitlines()]
    assert len(recs) == 2 * 2 * 2 * 2
    # S-NIAH-1: the needle is the only 7-digit number and the only line with its key -> both baselines solve it
    assert res["scores"]["regex"]["s-niah-1"] == {"600": 100.0, "1200": 100.0}
    assert res["scores"]["bm25"]["s-niah-1"] == {"600": 100.0, "1200": 100.0}
    assert all(
        r["prediction"] == r["outputs"][0] for r in recs if r["system"] == "regex" and r["task"] == "s-niah-1"
    )
    # mk-niah-2: the haystack is all 7-digit distractors; a regex capped at one answer mostly fails
    mk = [r for r in recs if r["system"] == "regex" and r["task"] == "mk-niah-2"]
    assert all(r["extra"]["n_matches"] > 3 for r in mk)
    assert len(res["data"]["dataset_hash"]["s-niah-1"]) == 64 and res["data"]["corpus_sha256"]["noise"]
    # resume: nothing is recomputed, the report is identical
    again = run(_cfg(tmp_path))
    assert len((tmp_path / RECORDS).read_text().splitlines()) == 16
    assert again["scores"] == res["scores"] and again["data"] == res["data"]
    # another seed -> new samples -> recomputed
    run(_cfg(tmp_path, seed=4))
    assert len((tmp_path / RECORDS).read_text().splitlines()) == 32


def test_run_rejects_bad_config(tmp_path):
    with pytest.raises(ValueError, match="unknown tasks"):
        run(_cfg(tmp_path, tasks=["niah_single_9"]))
    with pytest.raises(ValueError, match="unknown systems"):
        run(_cfg(tmp_path, systems=["gpt"]))
    with pytest.raises(ValueError, match="depths"):
        run(_cfg(tmp_path, depths=[120]))
    with pytest.raises(ValueError, match="needs --needles"):
        run(_cfg(tmp_path, tasks=["custom"]))


@pytest.mark.slow
def test_quick_cli_writes_all_outputs(tmp_path):
    from cli.main import app

    out = tmp_path / "q"
    args = ["eval", "niah", "--quick", "--tasks", "s-niah-1", "--lengths", "512", "--depths", "50",
            "--systems", "ttt,swa,full,regex", "--max-new-tokens", "3", "--out", str(out), "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = json.loads((out / "results.json").read_text())
    assert set(res["scores"]) == {"ttt", "swa", "full", "regex"}
    assert res["n_records"] == 4 and res["data"]["model_window"] == 64
    # debug window = 64: a depth-50 needle in a 512-token prompt is ~250 tokens back, outside the window
    recs = [json.loads(x) for x in (out / RECORDS).read_text().splitlines()]
    assert all(r["inside_window"] is False for r in recs)
    assert "| ttt | s-niah-1 |" in (out / "summary.md").read_text()
    for name in ["heatmap_ttt_s-niah-1.png", "heatmap_regex_s-niah-1.png", "length_s-niah-1.png"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
