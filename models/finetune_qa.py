"""QA fine-tune of ONE shipped reference model on a key-value lookup stream (issue 8), with before/after eval.

The shipped models continue the haystack instead of answering. This script continues training one of them
(``TrainConfig.init_from``) on ``ttt.data.build_qa_stream`` output: 50% synthetic reading documents (mostly
``ttt.synth`` kind ``kv``: facts inserted in a book passage, then a question; answers restate the key and copy
the value), 50% ordinary book text, validation books held out. Then it exports bf16 (``save_pretrained``) and
measures, before vs after, on the same data:
  (a) greedy answers to held-out kv questions from the VALIDATION books (``qa_eval.jsonl``): ``exact`` = every
      reference value occurs in the output, ``string_match_all`` = RULER's mean share of values found; split by
      layout (``sources`` = the hybrid reader's prompt, read with TTT frozen as hybrid does; ``plain`` = a long
      passage read with TTT on), by fact inside/outside the attention window, by value and question kind;
  (b) per-token validation loss on the held-out books (did the LM get worse?).

    # on this machine: build the stream with the SHIPPED tokenizer (xz-compressed, <= 22 MiB)
    python3 models/finetune_qa.py build ../shared/data/corpus/gutenberg-top100-authors.tar.xz data/qa-ft
    # on the GPU (one command each, <= 10 min): see models/README.md for the exact commands
    python3 models/finetune_qa.py run models/ttt-e2e-ref --data data/qa-ft --mode e2e --steps 500 \\
        --out $OUT/ttt-e2e-ref-qa --results $OUT/qa_finetune_e2e.json
    # evaluate any model dir on the same questions (CPU works)
    python3 models/finetune_qa.py eval models/ttt-e2e-ref --data data/qa-ft --results /tmp/before.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("finetune_qa")
REPO = Path(__file__).resolve().parents[1]


# ---- scoring --------------------------------------------------------------------------------------------
def match_share(pred: str, refs: list[str]) -> float:
    """RULER string_match_all for one sample: the share of references that occur in ``pred`` (case-insensitive)."""
    low = pred.lower()
    return sum(r.lower() in low for r in refs) / len(refs)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact (all values found) and string_match_all means, overall and per group."""

    def agg(sel: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(sel)
        return {
            "n": n,
            "exact": sum(r["share"] == 1.0 for r in sel) / n if n else None,
            "string_match_all": sum(r["share"] for r in sel) / n if n else None,
        }

    out: dict[str, Any] = {"all": agg(rows)}
    for key in ("fmt", "window", "value_kind", "question_kind"):
        for v in sorted({r[key] for r in rows}):
            out[f"{key}={v}"] = agg([r for r in rows if r[key] == v])
    return out


# ---- evaluation ----------------------------------------------------------------------------------------
def load_items(data_dir: Path, n: int | None) -> list[dict[str, Any]]:
    from ttt.data import QA_EVAL_FILE

    path = data_dir / QA_EVAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; build the data with `finetune_qa.py build`")
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return items[:n] if n else items


def generate_until(model: Any, tok: Any, prompt: str, values: list[str], max_new: int, device: Any) -> str:
    """Greedy decoding; stops at <|eos|>, after ``max_new`` tokens, or once every value has been written
    (RULER's score ignores what follows, so stopping early changes no score)."""
    import torch

    x = torch.tensor([tok.encode(prompt, add_bos=True)], dtype=torch.long, device=device)  # (1, T)
    out: list[int] = []
    for t in model.generate_iter(x, max_new_tokens=max_new, eos_id=tok.eos_id):
        if int(t[0]) == tok.eos_id:
            break
        out.append(int(t[0]))
        if len(out) % 4 == 0 and match_share(tok.decode(out), values) == 1.0:
            break
    return tok.decode(out)


def qa_eval(
    model: Any,
    tok: Any,
    items: list[dict[str, Any]],
    device: Any,
    slack: int = 16,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Greedy answers to kv questions; ``sources`` items are read with TTT frozen (as hybrid's reader does).

    ``budget_s``: start no new question after this many seconds (``n`` then says how many were answered)."""
    import torch

    from ttt import TTTModel

    frozen = model
    if model.cfg.n_ttt_layers > 0:  # hybrid's lookup reader: same weights, inner lr 0
        frozen = TTTModel(model.cfg.replace(ttt_lr=0.0)).to(device)
        frozen.load_state_dict(model.state_dict())
    model.eval(), frozen.eval()
    window = model.cfg.window
    rows, t0 = [], time.perf_counter()
    with torch.no_grad():
        for it in items:
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                log.warning("qa eval: %.0f s budget reached after %d of %d", budget_s, len(rows), len(items))
                break
            m = frozen if it["fmt"] == "sources" else model
            pred = generate_until(m, tok, it["prompt"], it["values"], it["answer_tokens"] + slack, device)
            inside = window is None or it["fact_distance"] < window
            rows.append(
                {
                    "share": match_share(pred, it["values"]),
                    "fmt": it["fmt"],
                    "window": "inside" if inside else "outside",
                    "value_kind": it["value_kind"],
                    "question_kind": it["question_kind"],
                    "pred": pred,
                    "values": it["values"],
                }
            )
    res = summarize(rows)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["stopped_by_budget"] = len(rows) < len(items)
    res["examples"] = [{k: r[k] for k in ("fmt", "window", "values", "pred")} for r in rows[:12]]
    return res


def val_loss(model: Any, data_dir: Path, seq: int, batch: int, n_batches: int, device: Any) -> dict[str, Any]:
    """Mean per-token NLL over the first ``n_batches`` validation batches (TTT on for TTT models)."""
    from ttt.data import SequenceLoader
    from ttt.train import evaluate

    val = SequenceLoader(data_dir, "val", seq, batch, shuffle=False)
    batches = [val.next_batch() for _ in range(max(1, min(n_batches, val.n_windows // batch)))]
    loss = evaluate(model, batches, device, bf16=False)
    return {"loss": loss, "tokens": sum(b.shape[0] * (b.shape[1] - 1) for b in batches)}


def evaluate_model(model_dir: Path, data_dir: Path, a: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    from ttt import TTTModel
    from ttt.tokenizer import Tokenizer

    model = TTTModel.from_pretrained(model_dir, dtype=torch.float32).to(device)
    tok = Tokenizer.from_pretrained(model_dir)
    return {
        "qa": qa_eval(model, tok, load_items(data_dir, a.eval_n), device, budget_s=a.eval_budget_s),
        "val": val_loss(model, data_dir, a.seq, a.batch, a.eval_batches, device),
    }


# ---- run -----------------------------------------------------------------------------------------------
PACK_PART_BYTES = 12 << 20  # the device returns files of at most 16 MiB


def pack_dir(src: Path, dst: Path, part_bytes: int = PACK_PART_BYTES) -> list[str]:
    """``src`` as an uncompressed tar cut into ``<name>.tar.part-000, -001, ...`` files in ``dst`` (each at most
    ``part_bytes``); ``cat <name>.tar.part-* | tar xf -`` restores it. Returns the part names."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(src.iterdir()):
            tar.add(f, arcname=f.name)
    data = buf.getvalue()
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for i, at in enumerate(range(0, len(data), part_bytes)):
        name = f"{src.name}.tar.part-{i:03d}"
        (dst / name).write_bytes(data[at : at + part_bytes])
        names.append(name)
    log.info("packed %s into %d parts in %s", src, len(names), dst)
    return names


def prepare_data(data: Path, work: Path, model_dir: Path) -> Path:
    """Plain .npy shards (decompressed into ``work/data`` when carried as .xz) built with the model's tokenizer."""
    from ttt.data import decompress_shards, load_index
    from ttt.tokenizer import Tokenizer

    if any(f.name.endswith(".npy.xz") for f in data.iterdir()):
        data = decompress_shards(data, work / "data")
    sha = Tokenizer.from_pretrained(model_dir).sha256()
    if load_index(data)["tokenizer_sha256"] != sha:
        raise ValueError(f"{data} was built with another tokenizer than {model_dir}/tokenizer.json")
    return data


def train_config(a: argparse.Namespace, data: Path) -> Any:
    from ttt import ModelConfig
    from ttt.train import TrainConfig

    shipped = ModelConfig.from_dict(json.loads((Path(a.model_dir) / "config.json").read_text()))
    return TrainConfig(
        data_dir=str(data),
        model="debug",  # every field is overridden by the shipped config below
        model_overrides=shipped.to_dict(),
        mode=a.mode,
        seq_len=a.seq,
        batch_size=a.batch,
        steps=max(1, a.steps),  # 0 = probed in run()
        lr=a.lr,
        min_lr=a.lr * 0.1,
        warmup_frac=a.warmup_frac,
        ilr_init=1.0,  # the shipped model is past its inner-lr warm-up
        init_from=str(a.model_dir),
        inner_checkpoint=a.inner_checkpoint,
        meta_every=a.meta_every,
        answer_weight=a.answer_weight,
        seed=a.seed,
        device=a.device,
        max_minutes=a.minutes,
        ckpt_every=max(a.steps, 1),
        eval_every=0,
        eval_batches=a.eval_batches,
        log_every=10,
        progress=False,
    )


def probe_step_seconds(cfg: Any, probe_dir: Path, device: Any) -> float:
    """Seconds per optimizer step of ``cfg`` on this device: one warm-up step, then the mean of the next
    ``max(3, meta_every)`` (steps 1..meta_every hold exactly one meta step, as every later window does)."""
    import torch

    from ttt.train import _setup, train_step

    run = _setup(dataclasses.replace(cfg, steps=10**6, max_minutes=None), probe_dir)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = max(3, cfg.meta_every)
    train_step(run)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        train_step(run)
    sync()
    dt = (time.perf_counter() - t0) / n
    del run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(probe_dir, ignore_errors=True)
    return dt


def run(a: argparse.Namespace) -> dict[str, Any]:
    from ttt.train import _resolve_device, export, train

    device = _resolve_device(a.device)
    work = Path(a.work or f"/tmp/qa-ft-{a.mode}")
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(Path(a.data), work, Path(a.model_dir))
    res: dict[str, Any] = {"before": None}
    t0 = time.perf_counter()
    if not a.no_before:
        res["before"] = evaluate_model(Path(a.model_dir), data, a, device)
        log.info("before: %s", _brief(res["before"]))
    res["eval_before_s"] = round(time.perf_counter() - t0, 1)
    cfg = train_config(a, data)
    if a.steps == 0:  # as many steps as fit in --minutes at the measured speed (the cosine then completes)
        step_s = probe_step_seconds(cfg, work / "probe", device)
        steps = max(1, int(a.minutes * 60 * 0.95 / step_s))
        res["probe"] = {"step_s": round(step_s, 4), "steps": steps}
        log.info("probe: %.3f s/step -> %d steps in %.1f min", step_s, steps, a.minutes)
        cfg = dataclasses.replace(cfg, steps=steps, ckpt_every=steps, max_minutes=a.minutes * 1.1)
    tr = train(cfg, work / "run")
    res["train"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(tr).items()}
    res["train_config"] = cfg.to_dict()
    export(work / "run", a.out)
    if a.pack:  # the export leaves the machine before anything else can fail or time out
        res["packed"] = pack_dir(Path(a.out), Path(a.pack))
    if a.no_after:
        return res
    t1 = time.perf_counter()
    res["after"] = evaluate_model(Path(a.out), data, a, device)
    res["eval_after_s"] = round(time.perf_counter() - t1, 1)
    log.info("after: %s", _brief(res["after"]))
    return res


def _brief(r: dict[str, Any]) -> str:
    qa = r["qa"]
    return (
        ", ".join(
            f"{k} {v['exact']:.3f}"
            for k, v in qa.items()
            if isinstance(v, dict) and v.get("exact") is not None
        )
        + f"; val loss {r['val']['loss']:.4f}"
    )


def _meta(a: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        sha = ""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and device != "cpu" else "cpu"
    return {
        "device": name,
        "git_sha": sha,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(a).items() if k != "func"},
        "seed": a.seed,
    }


def build(a: argparse.Namespace) -> dict[str, Any]:
    from ttt.data import QADataConfig, build_qa_stream, compress_shards
    from ttt.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(a.tokenizer_dir)  # the SHIPPED tokenizer, never retrained
    t0 = time.perf_counter()
    cfg = QADataConfig(
        train_tokens=a.tokens,
        seq_len=a.seq,
        synth_share=a.synth_share,
        weights=(a.kv_weight, *([(1 - a.kv_weight) / 3] * 3)),
        kv_max_tokens=a.kv_max_tokens,
        kv_sources_share=a.kv_sources_share,
        kv_sentence_share=a.kv_sentence_share,
        kv_attributes=a.kv_attributes,
        train_seed=a.train_seed,
        seed=a.seed,
        eval_questions=a.eval_n,
        max_books=a.max_books,
    )
    index = build_qa_stream(a.tar, a.out, tok, cfg)
    built = time.perf_counter() - t0
    size = compress_shards(a.out) if not a.no_compress else None
    res = {
        "build_s": round(built, 1),
        "compress_s": round(time.perf_counter() - t0 - built, 1),
        "bytes": size,
        "splits": {s: {k: v for k, v in d.items() if k != "shards"} for s, d in index["splits"].items()},
        "eval_questions": index["eval_questions"],
    }
    log.info("built %s", res)
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the QA fine-tune stream with the shipped tokenizer")
    b.add_argument("tar", help="corpus tarball (../shared/data/corpus/gutenberg-top100-authors.tar.xz)")
    b.add_argument("out", help="output dir (shards .npy.xz + index.json + tokenizer.json + qa_eval.jsonl)")
    b.add_argument(
        "--tokenizer-dir", default=str(REPO / "models" / "ttt-e2e-ref"), help="dir of tokenizer.json"
    )
    b.add_argument("--tokens", type=int, default=22_000_000, help="training tokens")
    b.add_argument("--synth-share", type=float, default=0.5, help="share of synthetic tokens")
    b.add_argument("--kv-weight", type=float, default=0.7, help="share of kv documents among synthetic ones")
    b.add_argument("--kv-max-tokens", type=int, default=1800, help="longest plain-layout kv passage")
    b.add_argument("--kv-sources-share", type=float, default=0.4, help="kv docs in the reader's layout")
    b.add_argument("--kv-sentence-share", type=float, default=0.6, help="kv answers restating the key")
    b.add_argument("--kv-attributes", choices=("base", "wide"), default="base", help="kv attribute names")
    b.add_argument("--train-seed", type=int, default=0, help="varies the training rows (eval set unchanged)")
    b.add_argument("--max-books", type=int, default=None, help="only the first N books (quick runs)")
    b.add_argument("--no-compress", action="store_true", help="keep plain .npy shards")
    for name, sp in (
        ("run", "fine-tune, export bf16, evaluate before/after"),
        ("eval", "evaluate a model dir"),
    ):
        r = sub.add_parser(name, help=sp)
        r.add_argument("model_dir", help="a save_pretrained dir (models/ttt-e2e-ref or models/fa-ref)")
        r.add_argument("--data", required=True, help="output of `build` (.npy or .npy.xz shards)")
        r.add_argument("--eval-batches", type=int, default=4, help="validation batches of seq x batch")
        r.add_argument("--device", default="auto", help="auto = cuda when available")
        r.add_argument(
            "--results", default=None, help="JSON output (default eval/results/qa_finetune_<mode>.json)"
        )
        if name == "run":
            r.add_argument("--out", required=True, help="export dir of the fine-tuned model (bf16)")
            r.add_argument(
                "--mode",
                choices=("e2e", "frozen", "fa", "swa"),
                required=True,
                help="e2e = meta_loss; frozen = the TTT model read with its update off (the hybrid reader)",
            )
            r.add_argument(
                "--meta-every", type=int, default=0, help="frozen: every N-th step is a meta_loss step"
            )
            r.add_argument(
                "--answer-weight", type=float, default=1.0, help="loss weight of answer tokens (plain steps)"
            )
            r.add_argument("--work", default=None, help="run dir (checkpoints; default /tmp/qa-ft-<mode>)")
            r.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 = fit --minutes (probed)")
            r.add_argument("--lr", type=float, default=1e-3, help="peak lr (pre-training used 3e-3)")
            r.add_argument("--warmup-frac", type=float, default=0.05, help="linear warm-up share of steps")
            r.add_argument(
                "--minutes", type=float, default=None, help="training time budget (stops + exports)"
            )
            r.add_argument("--inner-checkpoint", action="store_true", help="meta_loss with less memory")
            r.add_argument("--no-before", action="store_true", help="skip the evaluation before training")
            r.add_argument(
                "--no-after", action="store_true", help="skip the evaluation after (run `eval` later)"
            )
            r.add_argument(
                "--pack", default=None, help="dir for the export as <=12 MiB tar parts (right away)"
            )
    for sp in (sub.choices[n] for n in ("run", "eval")):
        sp.add_argument("--eval-budget-s", type=float, default=None, help="stop the QA eval after this long")
    for sp in (b, *[sub.choices[n] for n in ("run", "eval")]):
        sp.add_argument("--seq", type=int, default=2048, help="sequence length (build: row length)")
        sp.add_argument("--seed", type=int, default=0, help="data / training seed")
        sp.add_argument("--eval-n", type=int, default=200, help="held-out kv questions")
    sub.choices["run"].add_argument("--batch", type=int, default=16, help="sequences per step")
    sub.choices["eval"].add_argument("--batch", type=int, default=16, help="sequences per val batch")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a = parse_args(argv)
    if a.cmd == "run" and a.steps == 0 and not a.minutes:
        raise SystemExit("--steps 0 (auto) needs --minutes")
    if a.cmd == "build":
        return build(a)
    import torch

    from ttt.train import _resolve_device

    device = str(_resolve_device(a.device))
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    if a.cmd == "run":
        res = run(a)
    else:
        work = Path(tempfile.mkdtemp(prefix="qa-eval-"))
        data = prepare_data(Path(a.data), work, Path(a.model_dir))
        res = {"model": evaluate_model(Path(a.model_dir), data, a, torch.device(device))}
        shutil.rmtree(work, ignore_errors=True)
    res = {**_meta(a, device), **res, "total_s": round(time.perf_counter() - t0, 1)}
    out = Path(a.results or REPO / "eval" / "results" / f"qa_finetune_{getattr(a, 'mode', 'eval')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    log.info("wrote %s", out)
    return res


if __name__ == "__main__":
    main()
