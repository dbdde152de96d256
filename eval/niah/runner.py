"""Run systems over NIAH samples and record one JSON line per (task, system, length, depth, index).

Resumable: ``out/records.jsonl`` is appended after every sample and read back on start; a record is reused
only when its ``sample_hash`` matches the regenerated sample, so a changed seed or haystack is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eval.common import device_info
from eval.niah.dataset import iter_samples, iter_samples_interleaved
from eval.niah.haystack import Corpus, essay_corpus, noise_corpus
from eval.niah.scoring import sample_match_all
from eval.niah.systems import Systems, SystemsConfig
from eval.niah.tasks import TASKS, CustomNeedle, Sample, dataset_hash, load_needles

log = logging.getLogger(__name__)
RECORDS = "records.jsonl"


@dataclass(kw_only=True)
class RunConfig:
    tasks: list[str]
    systems: list[str]
    lengths: list[int]
    depths: list[float]
    samples: int = 1  # per (task, length, depth) cell
    seed: int = 42
    out: str = "eval/results/niah"
    haystack: str | None = None  # essay directory (default ../shared/data/haystack/pg_essays)
    needles: str | None = None  # JSONL of custom needles (task "custom")
    progress: bool = True
    sys: SystemsConfig = field(default_factory=SystemsConfig)
    # coverage order (index, depth, length, task: ``iter_samples_interleaved``) so a run cut short by
    # ``budget_s`` spreads evenly over tasks and lengths instead of finishing the first task only
    interleave: bool = False
    budget_s: float | None = None  # start no new sample after this many seconds; the report covers what ran
    # compute nothing: report the records already in out/records.jsonl (e.g. merged from several GPU calls)
    report_only: bool = False

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown tasks {bad}; choose from {list(TASKS)}")
        if "custom" in self.tasks and not self.needles:
            raise ValueError("task 'custom' needs --needles FILE")
        if self.needles and "custom" not in self.tasks:
            self.tasks.append("custom")
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError(f"lengths must be >= 64 tokens, got {self.lengths}")
        if not self.depths or not all(0 <= d <= 100 for d in self.depths):
            raise ValueError(f"depths must be percentages in [0, 100], got {self.depths}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ValueError(f"budget_s must be > 0 seconds, got {self.budget_s}")


def load_corpora(cfg: RunConfig) -> dict[str, Corpus]:
    kinds = {TASKS[t].haystack for t in cfg.tasks}
    out: dict[str, Corpus] = {}
    if "noise" in kinds:
        out["noise"] = noise_corpus()
    if "essay" in kinds:
        out["essay"] = essay_corpus(cfg.haystack)
    return out


def sample_hash(s: Sample) -> str:
    return hashlib.sha256(json.dumps([s.prompt, s.outputs]).encode()).hexdigest()[:16]


def _key(task: str, system: str, length: int, depth: float, index: int) -> str:
    return f"{task}|{system}|{length}|{depth:g}|{index}"


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    """Finished records by key (last one wins); a torn last line from a crash is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            log.warning("ignoring a torn line in %s", path)
            continue
        out[_key(r["task"], r["system"], r["length"], r["depth"], r["index"])] = r
    return out


class _Meter:
    """Wall time and peak memory of one prediction (CUDA: allocator peak; CPU: process peak RSS)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> _Meter:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.seconds = time.perf_counter() - self.t0


def _record(s: Sample, system: str, window: int | None) -> dict[str, Any]:
    dist = s.n_tokens - s.needle_token_pos  # tokens from the needle start to the end of the prompt
    return {
        "task": s.task, "system": system, "length": s.target_length, "n_tokens": s.n_tokens,
        "depth": s.depth, "index": s.index, "needle_token_pos": s.needle_token_pos,
        "needle_depth": round(s.needle_depth, 2), "window": window,
        "inside_window": window is None or dist <= window, "outputs": s.outputs, "sample_hash": sample_hash(s),
    }  # fmt: skip


def run_one(systems: Systems, name: str, s: Sample, window: int | None, device: str) -> dict[str, Any]:
    rec = _record(s, name, window)
    reason = systems.skip_reason(name, s)
    if reason:
        return rec | {"skipped": reason, "score": None, "prediction": None}
    try:
        prepare_s = systems.prepare(name, s)  # index build / corpus ingest: recorded, not in latency_s
        with _Meter(device) as m:
            pred = systems.predict(name, s)
    except ValueError as e:  # e.g. the hybrid reader rejects a question longer than its window
        log.warning("%s failed on %s/%s/%s: %s", name, s.task, s.target_length, s.index, e)
        return rec | {"skipped": f"error: {e}", "score": None, "prediction": None}
    return rec | {
        "skipped": None,
        "prediction": pred.text[:1000],
        "score": sample_match_all(pred.text, s.outputs),
        "latency_s": round(m.seconds, 4),
        "prepare_s": prepare_s,
        "peak_mem_bytes": m.peak,
        "extra": pred.extra,
    }


def _has(done: dict[str, dict[str, Any]], s: Sample, name: str) -> bool:
    """A finished record of system ``name`` on exactly this sample (same prompt and references) exists."""
    prev = done.get(_key(s.task, name, s.target_length, s.depth, s.index))
    return prev is not None and prev.get("sample_hash") == sample_hash(s)


def _run_grid(
    cfg: RunConfig, systems: Systems, corpora: dict[str, Corpus], custom: list[CustomNeedle], out: Path
) -> tuple[dict[str, dict[str, Any]], dict[str, list[Sample]], bool]:
    """Run every wanted (sample, system) not already in ``records.jsonl``; returns the records by key, the
    samples seen per task, and whether ``budget_s`` stopped the grid early."""
    from tqdm.auto import tqdm

    t0 = time.monotonic()
    window = systems.lm.window("ttt")
    info = device_info()
    device = info.get("gpu", info.get("device", "cpu"))  # stored per record: merged runs keep their device
    done = load_records(out / RECORDS)
    specs = [TASKS[t] for t in cfg.tasks]
    total = len(specs) * len(cfg.lengths) * len(cfg.depths) * cfg.samples
    samples_by_task: dict[str, list[Sample]] = {t: [] for t in cfg.tasks}
    bar = tqdm(total=total * len(cfg.systems), disable=not cfg.progress, desc="niah", unit="pred")
    stopped = False
    try:
        with (out / RECORDS).open("a", encoding="utf-8") as f:
            gen = iter_samples_interleaved if cfg.interleave else iter_samples
            it = gen(
                specs, lengths=cfg.lengths, depths=cfg.depths, n_samples=cfg.samples, seed=cfg.seed,
                tokenizer=systems.tokenizer, corpora=corpora, custom=custom,
            )  # fmt: skip
            for s in it:
                if cfg.budget_s is not None and time.monotonic() - t0 > cfg.budget_s:
                    log.warning(
                        "budget of %.0f s reached: stopping; rerun with the same out dir to resume",
                        cfg.budget_s,
                    )
                    stopped = True
                    break
                if cfg.report_only and not any(_has(done, s, n) for n in cfg.systems):
                    continue  # never run: not part of this report
                samples_by_task[s.task].append(s)
                for name in cfg.systems:
                    key = _key(s.task, name, s.target_length, s.depth, s.index)
                    if not _has(done, s, name):
                        if cfg.report_only:
                            done.pop(key, None)  # missing or stale: left out of the report
                            continue
                        done[key] = run_one(systems, name, s, window, cfg.sys.device) | {"device": device}
                        f.write(json.dumps(done[key]) + "\n")
                        f.flush()
                    bar.update(1)
                    bar.set_postfix_str(f"{s.task} {s.target_length} {name}")
    finally:
        bar.close()
    return done, samples_by_task, stopped


def run(cfg: RunConfig, systems: Systems | None = None) -> dict[str, Any]:
    """Run the grid, append records to ``out/records.jsonl``, write the report; returns results.json data.
    ``systems``: already loaded models/embedder to reuse (built from ``cfg.sys`` when None); closed at the end."""
    from eval.niah.report import write_report

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    corpora = load_corpora(cfg)
    custom: list[CustomNeedle] = load_needles(cfg.needles) if cfg.needles else []
    systems = systems or Systems(cfg.sys, cfg.systems)
    try:
        done, samples_by_task, stopped = _run_grid(cfg, systems, corpora, custom, out)
    finally:
        systems.close()
    wanted = {
        _key(s.task, n, s.target_length, s.depth, s.index)
        for ss in samples_by_task.values()
        for s in ss
        for n in cfg.systems
    }
    records = [r for k, r in done.items() if k in wanted]
    n_samples = sum(len(ss) for ss in samples_by_task.values())
    planned = len(cfg.tasks) * len(cfg.lengths) * len(cfg.depths) * cfg.samples
    grid_order = lambda s: (cfg.lengths.index(s.target_length), cfg.depths.index(s.depth), s.index)  # noqa: E731
    data = {  # the hash is taken in grid order, so interleaving does not change it
        "dataset_hash": {t: dataset_hash(sorted(ss, key=grid_order)) for t, ss in samples_by_task.items()},
        "corpus_sha256": {k: c.sha256 for k, c in corpora.items()},
        "corpus_source": {k: c.source for k, c in corpora.items()},
        "tokenizer_sha256": getattr(systems.tokenizer, "sha256", lambda: None)(),
        "model_window": systems.lm.window("ttt"),
        # every planned sample, every system: a report-only merge of a partial grid is not complete
        "complete": not stopped and len(records) == len(wanted) and n_samples == planned,
        "samples_done": n_samples,
        "samples_planned": planned,
        "record_devices": sorted({str(r.get("device", "unknown")) for r in records}),
    }
    run_cfg = asdict(cfg)
    return write_report(out, records, run_cfg, cfg.seed, data)
