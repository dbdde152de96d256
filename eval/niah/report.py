"""NIAH outputs: ``results.json``, ``summary.md``, depth x length heatmaps (gkamradt's layout) and
accuracy-vs-length plots. Scores are RULER ``string_match_all`` x100, averaged over non-skipped records."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from eval.common import run_metadata, write_results
from eval.niah.systems import RAG_SYSTEMS

log = logging.getLogger(__name__)
GK_COLORS = ["#F0496E", "#EBB839", "#0CD79F"]  # gkamradt's red -> yellow -> green


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return round(100.0 * sum(xs) / len(xs), 2) if xs else None


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Nested means: ``scores[system][task][length]``, ``inside_outside[system][task]``, ``heat[...]``."""
    by_stl: dict[tuple, list[float]] = defaultdict(list)
    by_io: dict[tuple, list[float]] = defaultdict(list)
    by_heat: dict[tuple, list[float]] = defaultdict(list)
    by_iol: dict[tuple, list[float]] = defaultdict(list)
    lat: dict[str, list[float]] = defaultdict(list)
    prep: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get("score") is None:
            continue
        s, t, n = r["system"], r["task"], r["length"]
        side = "inside" if r["inside_window"] else "outside"
        by_stl[(s, t, n)].append(r["score"])
        by_io[(s, t, side)].append(r["score"])
        by_iol[(s, t, n, side)].append(r["score"])
        by_heat[(s, t, r["depth"], n)].append(r["score"])
        lat[s].append(r["latency_s"])
        prep[s].append(r.get("prepare_s") or 0.0)
    scores: dict[str, Any] = defaultdict(lambda: defaultdict(dict))
    counts: dict[str, Any] = defaultdict(lambda: defaultdict(dict))
    for (s, t, n), v in sorted(by_stl.items()):
        scores[s][t][str(n)] = _mean(v)
        counts[s][t][str(n)] = len(v)
    io_len: dict[str, Any] = defaultdict(lambda: defaultdict(dict))
    for (s, t, n, k), v in sorted(by_iol.items()):
        io_len[s][t].setdefault(str(n), {})[k] = {"score": _mean(v), "n": len(v)}
    io: dict[str, Any] = defaultdict(lambda: defaultdict(dict))
    for (s, t, k), v in sorted(by_io.items()):
        io[s][t][k] = {"score": _mean(v), "n": len(v)}
    heat: dict[str, Any] = defaultdict(lambda: defaultdict(dict))
    for (s, t, d, n), v in sorted(by_heat.items()):
        heat[s][t].setdefault(f"{d:g}", {})[str(n)] = _mean(v)
    latency = {s: round(sum(v) / len(v), 4) for s, v in lat.items()}
    return {
        "scores": _plain(scores),
        "counts": _plain(counts),
        "inside_outside": _plain(io),
        "inside_outside_by_length": _plain(io_len),
        "heatmap": _plain(heat),
        "mean_latency_s": latency,
        "mean_prepare_s": {s: round(sum(v) / len(v), 4) for s, v in prep.items()},
    }


def _plain(d: Any) -> Any:
    return {k: _plain(v) for k, v in d.items()} if isinstance(d, dict) else d


def summary_md(agg: dict[str, Any], meta: dict[str, Any]) -> str:
    """Markdown: system x task x length table, inside/outside-window split, latency."""
    scores = agg["scores"]
    lengths = sorted({int(n) for s in scores.values() for t in s.values() for n in t})
    lines = [
        "# NIAH results",
        "",
        f"git `{meta['git_sha']}` · samples run on `{', '.join(meta.get('record_devices') or ['?'])}` · "
        f"report made on `{meta['device'].get('gpu', meta['device'].get('device'))}` · "
        f"seed {meta['seed']} · {meta['timestamp']}",
        "",
        "Score = RULER string_match_all x100 (mean over samples and depths). `-` = not run / skipped.",
        "",
        "| system | task | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|---|" + "---:|" * len(lengths),
    ]
    for s, tasks in scores.items():
        for t, row in tasks.items():
            cells = [_fmt(row.get(str(n))) for n in lengths]
            lines.append(f"| {s} | {t} | " + " | ".join(cells) + " |")
    lines += ["", "## Needle inside vs outside the attention window", ""]
    lines += ["| system | task | inside | outside |", "|---|---|---:|---:|"]
    for s, tasks in agg["inside_outside"].items():
        for t, io in tasks.items():
            cells = [
                f"{_fmt(io[k]['score'])} (n={io[k]['n']})" if k in io else "-" for k in ("inside", "outside")
            ]
            lines.append(f"| {s} | {t} | " + " | ".join(cells) + " |")
    lines += ["", "## Mean seconds per sample: answer (latency) and per-sample setup (index / ingest)", ""]
    lines += ["| system | latency | setup |", "|---|---:|---:|"]
    prep = agg.get("mean_prepare_s", {})
    lines += [f"| {s} | {v} | {prep.get(s, '-')} |" for s, v in agg["mean_latency_s"].items()]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def plot_heatmap(cells: dict[str, dict[str, float | None]], title: str, path: Path) -> None:
    """gkamradt layout: rows = depth percent (0 on top), columns = context length, red->green over 0..100."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    depths = sorted(cells, key=float)
    lengths = sorted({int(n) for row in cells.values() for n in row})
    grid = np.full((len(depths), len(lengths)), np.nan)  # (D, L)
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            v = cells[d].get(str(n))
            grid[i, j] = np.nan if v is None else v
    cmap = LinearSegmentedColormap.from_list("gk", GK_COLORS)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(depths)))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{float(d):g}" for d in depths])
    ax.set_xlabel("Token Limit")
    ax.set_ylabel("Depth Percent")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="Score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lengths(task: str, scores: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy vs context length for one task, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, tasks in scores.items():
        row = tasks.get(task)
        if not row:
            continue
        pts = sorted((int(n), v) for n, v in row.items() if v is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("string_match_all")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path, records: list[dict[str, Any]], config: dict[str, Any], seed: int, data: dict[str, Any]
) -> dict[str, Any]:
    """Write results.json, summary.md, heatmap_<system>_<task>.png and length_<task>.png under ``out``."""
    out = Path(out)
    agg = aggregate(records)
    meta = run_metadata(config, seed)
    plots = []
    for s, tasks in agg["heatmap"].items():
        for t, cells in tasks.items():
            p = out / f"heatmap_{s}_{t}.png"
            plot_heatmap(cells, f"{s} · {t}", p)
            plots.append(p.name)
    for t in sorted({t for tasks in agg["scores"].values() for t in tasks}):
        p = out / f"length_{t}.png"
        plot_lengths(t, agg["scores"], p)
        plots.append(p.name)
    skipped = sum(1 for r in records if r.get("skipped"))
    payload = meta | {"data": data, "n_records": len(records), "n_skipped": skipped, "plots": plots} | agg
    write_results("results.json", payload, out)
    # the devices the records ran on (merged runs: each its own), as the runner found them
    md_meta = meta | {"record_devices": data.get("record_devices")}
    (out / "summary.md").write_text(summary_md(agg, md_meta), encoding="utf-8")
    log.info("NIAH report in %s (%d records, %d plots)", out, len(records), len(plots))
    return payload


# ---- README material ---------------------------------------------------------------------------------------
# hybrid first, its ablations (RAG_SYSTEMS order), then fused and the rest
SYSTEM_ORDER = (
    "hybrid",
    *(s for s in RAG_SYSTEMS if s not in ("hybrid", "fused")),
    "fused",
    "retrieval",
    "bm25",
    "dense",
    "regex",
    "ttt",
    "swa",
    "full",
)
SYSTEM_NOTE = {
    "bm25": "bm25 (recall@k)", "dense": "dense (recall@k)", "regex": "regex (value pattern)",
    "full": "full (FA control)", "hybrid": "hybrid (auto route)", "hybrid-prefix": "hybrid after RULER's answer prefix (ablation)",
    "hybrid-copy": "hybrid, copy-constrained lookups (ablation)",
    "hybrid-copy1": "hybrid, lookups copy from the top source only (ablation)", "hybrid-cad": "hybrid, context-aware decoding (ablation)",
    "hybrid-value": "hybrid, value questions answered with source values only",
    "hybrid-free": "hybrid, free generation (ablation; the default before 2026-12-07)",
}  # fmt: skip


def load_results(results_dir: str | Path) -> dict[str, Any]:
    """``results.json`` of a run; per-length inside/outside splits are recomputed from ``records.jsonl`` for
    results written before they were stored (only records of the run's systems, tasks and lengths)."""
    import json

    d = Path(results_dir)
    path = d / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass the output dir of a NIAH run")
    res = json.loads(path.read_text(encoding="utf-8"))
    if "inside_outside_by_length" not in res or "counts" not in res:
        from eval.niah.runner import RECORDS, load_records

        cfg = res.get("config", {})
        keep = lambda r: (  # noqa: E731
            r["system"] in cfg.get("systems", [r["system"]]) and r["task"] in cfg.get("tasks", [r["task"]])
            and r["length"] in cfg.get("lengths", [r["length"]])
        )  # fmt: skip
        recs = [r for r in load_records(d / RECORDS).values() if keep(r)]
        log.warning("%s predates per-length splits: recomputed from %d records", path, len(recs))
        agg = aggregate(recs)
        res["inside_outside_by_length"], res["counts"] = agg["inside_outside_by_length"], agg["counts"]
    return res


def _pct(x: float | None, n: int | None = None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if n is None else f"{x:.0f} <sub>{n}</sub>"


def readme_table(res: dict[str, Any], img_dir: str = "") -> tuple[str, list[str]]:
    """Markdown for the README: one row per (task, system), one column per length, accuracy in % (RULER
    string_match_all x100, mean over depths and samples); ``ttt`` also split into rows for needles inside and
    outside its attention window, with the sample count as a subscript. Returns (markdown, heatmap paths)."""
    scores, counts, io_len = res["scores"], res.get("counts", {}), res.get("inside_outside_by_length", {})
    lengths = sorted({int(n) for s in scores.values() for t in s.values() for n in t})
    tasks = list(dict.fromkeys(t for s in scores.values() for t in s))
    systems = [s for s in SYSTEM_ORDER if s in scores] + [s for s in scores if s not in SYSTEM_ORDER]
    window = res.get("data", {}).get("model_window")
    notes = dict(SYSTEM_NOTE)
    if not res.get("config", {}).get("sys", {}).get("full_model_dir"):
        notes["full"] = "full (TTT weights, window=None)"
    head = "| task | system | " + " | ".join(str(n) for n in lengths) + " |"
    lines = [head, "|---|---|" + "---:|" * len(lengths)]
    for t in tasks:
        for s in systems:
            row = scores.get(s, {}).get(t)
            if row is None:
                continue
            cells = [_pct(row.get(str(n))) for n in lengths]
            lines.append(f"| {t} | {notes.get(s, s)} | " + " | ".join(cells) + " |")
            if s == "ttt":
                for side in ("inside", "outside"):
                    split = io_len.get(s, {}).get(t, {})
                    cells = [_pct(*_score_n(split.get(str(n), {}).get(side))) for n in lengths]
                    label = f"ttt, needle {side} the {window}-token window"
                    lines.append(f"| {t} | {label} | " + " | ".join(cells) + " |")
    n_cells = [n for s in counts.values() for t in s.values() for n in t.values()]
    dev = res.get("device", {})
    foot = (
        f"\nAccuracy in % (RULER string_match_all), mean over needle depths "
        f"{', '.join(f'{float(d):g}' for d in res.get('config', {}).get('depths', []))}% and samples; "
        f"{min(n_cells, default=0)}-{max(n_cells, default=0)} samples per cell (subscripts: samples in that split). "
        f"Device {', '.join(res.get('data', {}).get('record_devices') or [dev.get('gpu', dev.get('device', '?'))])}, "
        f"git `{res.get('git_sha', '?')}`, seed {res.get('seed')}."
    )
    if not res.get("data", {}).get("complete", True):
        done, planned = res["data"].get("samples_done"), res["data"].get("samples_planned")
        foot += f" Time-boxed run: {done} of {planned} planned samples."
    prefix = img_dir.rstrip("/") + "/" if img_dir else ""
    heatmaps = [prefix + p for p in res.get("plots", []) if p.startswith("heatmap_")]
    return "\n".join(lines) + "\n" + foot + "\n", heatmaps


def _score_n(cell: dict[str, Any] | None) -> tuple[float | None, int | None]:
    return (None, None) if not cell else (cell["score"], cell["n"])


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Print the README table and heatmap list of a NIAH run.")
    ap.add_argument("results_dir", help="a run's output dir (holds results.json, records.jsonl, PNGs)")
    ap.add_argument("--img-dir", default=None, help="path prefix for the heatmaps (default: RESULTS_DIR)")
    a = ap.parse_args(argv)
    table, heatmaps = readme_table(load_results(a.results_dir), a.img_dir or a.results_dir)
    print(table)  # noqa: T201 - CLI output
    print("Heatmaps (depth x length, gkamradt layout):\n")  # noqa: T201
    print("\n".join(f"- ![{Path(p).stem}]({p})" for p in heatmaps))  # noqa: T201


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    main()
