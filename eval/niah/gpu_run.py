"""The full NIAH grid with the shipped model on the GPU machine (no typer, faiss, bm25s, ...): one call of
about 8 minutes per run, resumable across calls, merged into one report on any machine.

    # call 1 (carry models/ttt-e2e-ref .carry/niah .carry/essays): every system but `full`
    PYTHONPATH=. python3 -m eval.niah.gpu_run --out /tmp/niah --archive $OUT/niah.tar.gz \\
        --model models/ttt-e2e-ref --full-model '' --embedder .carry/niah/embedder \\
        --haystack .carry/essays --wordlists .carry/niah/wonderwords \\
        --systems ttt,swa,retrieval,bm25,dense,regex,hybrid,fused
    # call 2 (carry models/fa-ref .carry/niah/wonderwords .carry/essays): the FA control, same samples
    PYTHONPATH=. python3 -m eval.niah.gpu_run --out /tmp/niah --archive $OUT/niah.tar.gz \\
        --model models/fa-ref --full-model models/fa-ref --systems full --budget-s 60 \\
        --haystack .carry/essays --wordlists .carry/niah/wonderwords --no-preflight
    # anywhere: merge both archives into one report (computes nothing), then the README table
    PYTHONPATH=. python3 -m eval.niah.gpu_run --report-only --out eval/results/niah-gpu --device cpu \\
        --resume-from call1/niah.tar.gz call2/niah.tar.gz --model models/ttt-e2e-ref --full-model models/fa-ref
    PYTHONPATH=. python3 -m eval.niah.report eval/results/niah-gpu

Defaults: the 8 RULER tasks + ``lowlex-niah`` and ``lowlex-mk-niah``; all 15 systems (``hybrid-prefix``, ``hybrid-copy``, ``hybrid-copy1``, ``hybrid-value``, ``hybrid-free``, ``hybrid-cad``: ablations); lengths 512..8192 (1x-16x the 512 window);
depths 0,25,50,75,100; up to 5 samples per (task, length, depth) cell, visited in coverage order (index,
depth, length, task: ``RunConfig.interleave``) so the ``--budget-s`` stop (420 s) leaves an even prefix of
the grid, the same prefix in every call; ``--max-new-tokens 128`` (RULER's) for every system (a UUID is 33
tokens with the shipped tokenizer, and readers restate the key first; on the H100 on 2026-12-07 the 476 answers of
``hybrid``/``hybrid-copy1`` that ran at both 40 and 128 were identical: the shipped reader stops by itself). The two models share one tokenizer, so both calls build identical samples.

Before the grid a preflight builds the embedder, the shipped router and a ``HybridRAG`` around the loaded
model and answers one question per route, so a missing dependency fails in seconds, not mid-grid.
Resumable: ``--resume-from`` takes earlier ``records.jsonl`` / ``niah.tar.gz`` files; finished records are
reused, so a repeated call extends the covered prefix. ``--archive`` packs the output dir into one tar.gz
(the device returns at most 8 files) and puts ``summary.md`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from eval.niah.runner import RECORDS, RunConfig, load_records, run
from eval.niah.systems import SYSTEMS, Systems, SystemsConfig
from eval.niah.tasks import RULER_TASK_NAMES, WORDLISTS_ENV

log = logging.getLogger("eval.niah.gpu_run")

TASKS = [*RULER_TASK_NAMES, "lowlex-niah", "lowlex-mk-niah"]
LENGTHS = [512, 1024, 2048, 4096, 8192]
DEPTHS = [0.0, 25.0, 50.0, 75.0, 100.0]


def _csv(kind: type) -> Any:
    def parse(s: str) -> list:
        try:
            return [kind(x) for x in s.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {s!r}") from e

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="eval/results/niah-gpu", help="output dir (records, results, PNGs)")
    ap.add_argument("--archive", default=None, help="also pack --out into this .tar.gz when done")
    ap.add_argument("--resume-from", nargs="*", default=None,
                    help="earlier records.jsonl / niah.tar.gz files (several: merged) to continue from")  # fmt: skip
    ap.add_argument("--model", default="models/ttt-e2e-ref", help="TTT-E2E checkpoint dir ('' = debug)")
    ap.add_argument("--full-model", default="models/fa-ref", help="FA control dir for `full` ('' or absent "
                    "= the TTT weights with window=None)")  # fmt: skip
    ap.add_argument("--embedder", default=None, help="exported MiniLM dir (eval/niah/export_embedder.py)")
    ap.add_argument("--haystack", default=None, help="essay dir (default ../shared/data/haystack/pg_essays)")
    ap.add_argument(
        "--wordlists", default=None, help=f"dir with adjectivelist.txt/nounlist.txt ({WORDLISTS_ENV})"
    )
    ap.add_argument("--tasks", type=_csv(str), default=TASKS, help="comma list (default: 8 RULER + 2 lowlex)")
    ap.add_argument("--systems", type=_csv(str), default=list(SYSTEMS), help="comma list (default: all 15)")
    ap.add_argument("--lengths", type=_csv(int), default=LENGTHS, help="prompt lengths in model tokens")
    ap.add_argument("--depths", type=_csv(float), default=DEPTHS, help="needle depths in percent")
    ap.add_argument("--samples", type=int, default=5, help="samples per (task, length, depth) cell")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new sample after this (0 = none)")
    ap.add_argument(
        "--max-new-tokens", type=int, default=128, help="generation cap, identical for all systems (RULER's)"
    )
    ap.add_argument("--top-k", type=int, default=5, help="retrieved chunks")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on cuda)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--chat-template", default="base", help="base | reader: how the LM systems wrap RULER's input"
    )
    ap.add_argument("--no-preflight", action="store_true", help="skip the router/HybridRAG preflight")
    ap.add_argument("--report-only", action="store_true", help="compute nothing: report the records in --out "
                    "(+ --resume-from), e.g. merged from several calls")  # fmt: skip
    ap.add_argument("--progress", action="store_true", help="tqdm bar (off by default: logs stay short)")
    return ap.parse_args(argv)


def build_config(a: argparse.Namespace) -> RunConfig:
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    full = a.full_model if a.full_model and Path(a.full_model, "config.json").exists() else None
    if a.full_model and full is None:
        log.warning(
            "no checkpoint at --full-model %s: `full` uses the TTT weights with window=None", a.full_model
        )
    return RunConfig(
        tasks=a.tasks, systems=a.systems, lengths=a.lengths, depths=a.depths, samples=a.samples, seed=a.seed,
        out=a.out, haystack=a.haystack, progress=a.progress, interleave=True, budget_s=None if a.report_only else (a.budget_s or None),
        report_only=a.report_only,
        sys=SystemsConfig(
            model_dir=a.model or None, full_model_dir=full, device=device, dtype=dtype,
            max_new_tokens=a.max_new_tokens, top_k=a.top_k, embedder_dir=a.embedder, seed=a.seed,
            chat_template=a.chat_template,
        ),
    )  # fmt: skip


def restore_records(src: str | Path, out: Path) -> int:
    """Put an earlier run's records into ``out/records.jsonl`` (from a .jsonl or a gpu_run .tar.gz)."""
    src, dst = Path(src), out / RECORDS
    out.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".jsonl":
        text = src.read_text(encoding="utf-8")
    else:
        with tarfile.open(src) as tar:
            member = next((m for m in tar.getmembers() if Path(m.name).name == RECORDS), None)
            if member is None:
                raise FileNotFoundError(f"{src} holds no {RECORDS}")
            text = tar.extractfile(member).read().decode("utf-8")
    with dst.open("a", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") or not text else text + "\n")
    merged = load_records(dst)  # one record per (task, system, length, depth, index), the last one wins
    tmp = dst.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in merged.values()), encoding="utf-8")
    os.replace(tmp, dst)  # restoring the same archive twice leaves the file as it was
    return text.count("\n")


def preflight(systems: Systems, max_new_tokens: int) -> dict[str, Any]:
    """Embedder, router and a ``HybridRAG`` around the loaded model answer one question on each route."""
    from hybrid.rag import HybridRAG
    from retrieval import Index

    t0 = time.perf_counter()
    emb = systems.embedder()
    router = systems.router()
    q = "What is the special magic number for quiet-harbor?"
    decision = router.route(q)
    doc = (
        "The grass is green. One of the special magic numbers for quiet-harbor is: 4829104. The sky is blue."
    )
    out: dict[str, Any] = {"embedder": getattr(emb, "name", "?"), "auto_route": decision.route}
    with tempfile.TemporaryDirectory(prefix="niah-preflight-") as tmp:
        index = Index.create(Path(tmp) / "store", embedder=emb)
        rag = HybridRAG(systems.lm.variant("ttt"), systems.lm.tokenizer, index, router=router)
        rag.ingest([("doc", doc)])
        for route in ("lookup", "comprehension", "fused"):
            try:
                out[route] = rag.answer(q, route=route, max_new_tokens=max_new_tokens).text[:80]
            except ValueError as e:  # e.g. the debug model's 64-token window is too small for the reader
                out[route] = f"error: {e}"
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if a.wordlists:
        os.environ[WORDLISTS_ENV] = a.wordlists
    if a.embedder:  # every default embedder (index, router) then loads the export, never the PyPI package
        os.environ["TTT_RAG_EMBEDDER_DIR"] = a.embedder
    cfg = build_config(a)
    out = Path(cfg.out)
    for src in a.resume_from or []:
        log.info("restored %d records from %s", restore_records(src, out), src)
    systems = Systems(cfg.sys, cfg.systems)
    if not (a.no_preflight or a.report_only):
        log.info("preflight: %s", json.dumps(preflight(systems, 8)))
    t0 = time.perf_counter()
    res = run(cfg, systems)  # the preflight's loaded models and embedder are reused
    log.info(
        "grid %s: %d/%d samples in %.0f s; mean latency per system (s): %s",
        "complete" if res["data"]["complete"] else "incomplete (--budget-s reached or records missing)",
        res["data"]["samples_done"], res["data"]["samples_planned"], time.perf_counter() - t0,
        json.dumps(res["mean_latency_s"]),
    )  # fmt: skip
    if a.archive:
        Path(a.archive).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(a.archive, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        shutil.copy2(out / "summary.md", Path(a.archive).with_name("summary.md"))
        log.info("packed %s into %s", out, a.archive)
    return res


if __name__ == "__main__":
    main()
