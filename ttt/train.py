"""Pre-training loop for TTT-E2E and its controls (``ttt-e2e.md`` §3), resumable across short GPU commands.

Modes (same tokens, same order, same budget for a fair comparison):
  - ``e2e``: ``model.meta_loss`` (second-order meta-learning through the inner SGD steps), inner-lr warm-up
    ``ilr_init -> 1`` over the first ``ilr_warmup_frac`` of steps (official code, §2.3);
  - ``fa``: full causal attention, no TTT, plain next-token CE of ``model(tokens)``;
  - ``swa``: sliding-window attention, no TTT, plain next-token CE.
Outer loop: AdamW (0.9, 0.95), weight decay 0.1 on all parameters, global-norm clip 1.0, linear warm-up over
10% of steps from 0 then cosine to 1e-5 (optax ``warmup_cosine_decay_schedule``), bf16 autocast on CUDA.

``run_dir`` holds ``train_config.json``, ``ckpt.pt`` (model + optimizer + step + data position + RNG,
written atomically) and ``log.jsonl``. Calling ``train`` again on the same dir resumes bit-exactly; with
``max_minutes`` it stops and checkpoints before the budget ends (a GPU command lasts <= 10 minutes).

Example (Python)::

    cfg = TrainConfig(data_dir="data/packed", model="debug", mode="e2e", seq_len=256, steps=100)
    train(cfg, "runs/e2e-debug")
    export("runs/e2e-debug", "models/e2e-debug")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ttt.config import ModelConfig
from ttt.data import SequenceLoader, load_index
from ttt.inner import token_nll as chunk_token_nll
from ttt.model import TTTModel
from ttt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MODES = ("e2e", "frozen", "fa", "swa")
CKPT_FILE, CONFIG_FILE, LOG_FILE = "ckpt.pt", "train_config.json", "log.jsonl"
# TrainConfig fields that may change between resumed commands (everything else must match the checkpoint)
_RESUMABLE_CHANGES = {
    "max_minutes",
    "device",
    "ckpt_every",
    "eval_every",
    "eval_batches",
    "log_every",
    "progress",
}


@dataclass(kw_only=True)
class TrainConfig:
    """One training run. Defaults follow the paper's recipe; sizes are for the caller to scale."""

    data_dir: str  # output of ``ttt-rag train data`` / ``pack`` (shards + index.json + tokenizer.json)
    model: str = "debug"  # ModelConfig preset name
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"d_model": 512, "window": 512}
    mode: str = "e2e"  # "e2e" | "frozen" (TTT model, inner update off: the hybrid reader) | "fa" | "swa"
    seq_len: int = 1024  # tokens per training sequence (inputs); each sample is seq_len + 1 tokens
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps in the whole run (the schedule's length)
    lr: float = 3e-3  # peak outer lr (paper 125M: 3e-3)
    min_lr: float = 1e-5  # cosine floor
    warmup_frac: float = 0.1
    weight_decay: float = 0.1  # on all parameters, norms and embeddings included (official code)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ilr_init: float = 0.1  # inner-lr multiplier at step 0 (e2e only)
    ilr_warmup_frac: float = 0.1  # ... ramps linearly to 1.0 over this share of steps
    init_from: str | None = None  # model dir (save_pretrained) to start from when run_dir has no ckpt.pt
    meta_every: int = 0  # frozen mode: every N-th step is a meta_loss step (keeps W0 good for TTT); 0 = never
    answer_weight: float = 1.0  # plain-forward steps: weight of answer tokens (answer_marker .. EOS)
    answer_marker: str = "\nAnswer:"  # where an answer starts in the QA documents (ttt.synth's prompts)
    inner_checkpoint: bool = False  # meta_loss(checkpoint=True): recompute chunks in backward (less memory)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available
    bf16: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    max_minutes: float | None = None  # stop + checkpoint before this much wall time in this call
    ckpt_every: int = 100
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 4  # validation batches (fixed, first sequences of the held-out books)
    log_every: int = 10
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.answer_weight > 0 or (self.answer_weight != 1.0 and self.mode == "e2e"):
            raise ValueError(
                f"answer_weight must be > 0 and needs plain-forward steps, got {self.answer_weight}"
            )
        if self.meta_every < 0 or (self.meta_every and self.mode != "frozen"):
            raise ValueError(f"meta_every must be >= 0 and only set in mode 'frozen', got {self.meta_every}")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.ilr_warmup_frac <= 1:
            raise ValueError("warmup_frac must be in [0, 1) and ilr_warmup_frac in [0, 1]")
        self.betas = tuple(self.betas)  # JSON round trip gives a list

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    done: bool  # reached cfg.steps
    train_loss: float | None
    val_loss: float | None
    tokens_seen: int
    elapsed_s: float  # wall time summed over all resumed calls


# ---- schedules -----------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """optax warmup_cosine_decay_schedule(0, lr, warmup=int(warmup_frac*steps), decay=steps, end=min_lr)."""
    warm = int(cfg.warmup_frac * cfg.steps)
    if step < warm:
        return cfg.lr * step / warm
    t = min(1.0, (step - warm) / max(1, cfg.steps - warm))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def ilr_scale_at(step: int, cfg: TrainConfig) -> float:
    """Inner-lr multiplier: ilr_init -> 1 linearly over the first ilr_warmup_frac of steps."""
    warm = int(cfg.ilr_warmup_frac * cfg.steps)
    if warm == 0:
        return 1.0
    return cfg.ilr_init + (1.0 - cfg.ilr_init) * min(1.0, step / warm)


# ---- model and losses ---------------------------------------------------------------------------------
def model_config(cfg: TrainConfig, tok: Tokenizer) -> ModelConfig:
    """The ModelConfig of this run's mode: e2e/frozen = preset, fa/swa = the preset's no-TTT controls."""
    over = {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, **cfg.model_overrides}
    if cfg.mode in ("e2e", "frozen"):
        mcfg = ModelConfig.from_name(cfg.model, **over)
        if mcfg.n_ttt_layers == 0:
            raise ValueError(f"mode {cfg.mode!r} needs n_ttt_layers > 0; use mode 'fa' or 'swa' for controls")
        return mcfg
    if cfg.mode == "fa":
        return ModelConfig.fa_control(cfg.model, **{**over, "window": None, "n_ttt_layers": 0})
    return ModelConfig.swa_control(cfg.model, **{**over, "n_ttt_layers": 0})


def token_nll(model: TTTModel, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T+1) tokens -> (B, T) NLL of tokens[:, 1:]: TTT models read with prefill, others one forward."""
    if model.cfg.n_ttt_layers > 0:
        return model.prefill(tokens).token_nll[:, 1:].float()
    return chunk_token_nll(model(tokens[:, :-1]).float(), tokens[:, 1:])  # (B, T)


def answer_mask(inputs: torch.Tensor, marker: Sequence[int], resets: Sequence[int]) -> torch.Tensor:
    """(B, T) bool: True where the target after ``inputs[:, t]`` belongs to an answer, i.e. the latest ``marker``
    token run ending at or before t comes after the latest reset token (BOS / EOS) at or before t. The EOS
    that ends an answer is part of it (the reader learns to stop)."""
    assert len(marker) > 0, "empty answer marker"
    B, T = inputs.shape
    ends = torch.ones_like(inputs, dtype=torch.bool)  # marker ends at t: inputs[t - j] == marker[-1 - j]
    for j, m in enumerate(reversed(marker)):
        ends[:, :j] = False
        ends[:, j:] &= inputs[:, : T - j] == m
    idx = torch.arange(T, device=inputs.device).expand(B, T)
    last_marker = torch.where(ends, idx, -1).cummax(dim=1).values  # (B, T)
    is_reset = torch.isin(inputs, torch.tensor(list(resets), device=inputs.device))
    last_reset = torch.where(is_reset, idx, -1).cummax(dim=1).values
    return last_marker > last_reset


def lm_loss(
    model: TTTModel, tokens: torch.Tensor, answer: tuple[Sequence[int], Sequence[int], float] | None = None
) -> torch.Tensor:
    """Mean next-token CE of ``model(tokens[:, :-1])``, BOS targets masked like meta_loss does.

    ``answer = (marker ids, reset ids, weight)``: answer tokens (``answer_mask``) weigh ``weight`` times the
    others in a weighted mean."""
    logits = model(tokens[:, :-1])  # (B, T, V)
    bos = model.cfg.bos_id
    ignore = -100 if bos is None else bos
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 CE under bf16; fp64 stays
    if answer is None or answer[2] == 1.0:
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=ignore)
    ce = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], ignore_index=ignore, reduction="none")
    w = torch.where(answer_mask(tokens[:, :-1], answer[0], answer[1]), answer[2], 1.0).to(ce.dtype)
    w = w * (tokens[:, 1:] != ignore)  # (B, T)
    return (ce * w).sum() / w.sum().clamp(min=1e-12)


def is_meta_step(cfg: TrainConfig, step: int) -> bool:
    """e2e: every step runs meta_loss; frozen: every ``meta_every``-th step (the others a plain forward)."""
    if cfg.mode == "e2e":
        return True
    return cfg.mode == "frozen" and cfg.meta_every > 0 and step % cfg.meta_every == cfg.meta_every - 1


def compute_loss(
    model: TTTModel,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    step: int,
    answer_ids: tuple[Sequence[int], Sequence[int]] | None = None,
) -> torch.Tensor:
    """meta_loss (TTT while reading) on meta steps, else next-token CE of the plain forward (W0, no update),
    answer tokens weighted by ``cfg.answer_weight`` (``answer_ids`` = (marker ids, reset ids))."""
    if is_meta_step(cfg, step):
        return model.meta_loss(tokens, checkpoint=cfg.inner_checkpoint, ilr_scale=ilr_scale_at(step, cfg))
    return lm_loss(model, tokens, None if answer_ids is None else (*answer_ids, cfg.answer_weight))


@torch.no_grad()
def evaluate(model: TTTModel, batches: list[torch.Tensor], device: torch.device, bf16: bool) -> float:
    """Mean per-token NLL over fixed validation batches (BOS targets excluded), inner lr = 1."""
    model.eval()
    total, count = 0.0, 0
    for tokens in batches:
        tokens = tokens.to(device)
        with _autocast(device, bf16):
            nll = token_nll(model, tokens)  # (B, T)
        keep = tokens[:, 1:] != (model.cfg.bos_id if model.cfg.bos_id is not None else -1)
        total += float(nll[keep].double().sum())
        count += int(keep.sum())
    model.train()
    return total / max(1, count)


def _autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---- checkpoints ----------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temp file, then rename over ckpt.pt: a crash never leaves a torn checkpoint."""
    tmp = run_dir / (CKPT_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, run_dir / CKPT_FILE)


def _check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    path = run_dir / CONFIG_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(cfg.to_dict()))
        diff = sorted(
            k for k in set(old) | set(new) if k not in _RESUMABLE_CHANGES and old.get(k) != new.get(k)
        )
        if diff and (run_dir / CKPT_FILE).is_file():
            raise ValueError(f"{run_dir} holds a run with a different config ({diff}); use a new run_dir")
    path.write_text(json.dumps(cfg.to_dict(), indent=2))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be recomputed)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


# ---- the loop -------------------------------------------------------------------------------------------
@dataclass
class _Run:
    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    tok: Tokenizer
    model: TTTModel
    opt: torch.optim.Optimizer
    loader: SequenceLoader
    val_batches: list[torch.Tensor]
    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # summed over earlier calls
    val_loss: float | None = None
    answer_ids: tuple[list[int], list[int]] | None = None  # (answer marker ids, reset ids) for answer_weight

    def payload(self, elapsed_now: float) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optim": self.opt.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s + elapsed_now,
            "val_loss": self.val_loss,
            "loader": self.loader.state_dict(),
            "rng": _rng_state(),
            "config": self.cfg.to_dict(),
            "model_config": self.model.cfg.to_dict(),
        }


def _setup(cfg: TrainConfig, run_dir: Path) -> _Run:
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resume_config(run_dir, cfg)
    tok = Tokenizer.from_pretrained(cfg.data_dir)
    index = load_index(cfg.data_dir)
    if index["tokenizer_sha256"] != tok.sha256():
        raise ValueError(
            f"{cfg.data_dir}: tokenizer.json does not match the tokenizer the shards were built with"
        )
    device = _resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = TTTModel(model_config(cfg, tok)).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=0.0, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=1e-8
    )
    loader = SequenceLoader(cfg.data_dir, "train", cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    val_batches: list[torch.Tensor] = []
    if cfg.eval_batches > 0:
        val = SequenceLoader(cfg.data_dir, "val", cfg.seq_len, cfg.batch_size, shuffle=False)
        val_batches = [
            val.next_batch() for _ in range(min(cfg.eval_batches, val.n_windows // cfg.batch_size or 1))
        ]
    run = _Run(cfg, run_dir, device, tok, model, opt, loader, val_batches)
    if cfg.answer_weight != 1.0:
        run.answer_ids = (
            tok.encode(cfg.answer_marker),
            [i for i in (tok.bos_id, tok.eos_id) if i is not None],
        )
    ckpt_path = run_dir / CKPT_FILE
    if cfg.init_from and not ckpt_path.is_file():
        _init_weights(model, Path(cfg.init_from))
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        loader.load_state_dict(ck["loader"])
        _set_rng_state(ck["rng"])
        run.step, run.tokens_seen, run.elapsed_s = ck["step"], ck["tokens_seen"], ck["elapsed_s"]
        run.val_loss = ck.get("val_loss")
        _truncate_log(run_dir / LOG_FILE, run.step)
        log.info("resumed %s at step %d/%d", run_dir, run.step, cfg.steps)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s mode=%s params=%.2fM device=%s", cfg.model, cfg.mode, n_params / 1e6, device)
    return run


def _init_weights(model: TTTModel, src: Path) -> None:
    """Copy weights from an exported model dir (e.g. a bf16 export after the device was lost); fresh optimizer."""
    ref = TTTModel.from_pretrained(src, dtype=torch.float32)
    if ref.cfg.to_dict() != model.cfg.to_dict():
        raise ValueError(f"init_from {src}: its config differs from this run's model config")
    model.load_state_dict(ref.state_dict())
    log.info("initialised weights from %s", src)


def train_step(run: _Run) -> tuple[float, float]:
    """One optimizer step (grad_accum micro-batches); returns (mean loss, pre-clip grad norm)."""
    cfg, step = run.cfg, run.step
    for g in run.opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    total = 0.0
    for _ in range(cfg.grad_accum):
        tokens = run.loader.next_batch().to(run.device, non_blocking=True)  # (B, L + 1)
        with _autocast(run.device, cfg.bf16):
            loss = compute_loss(run.model, tokens, cfg, step, run.answer_ids)
        (loss / cfg.grad_accum).backward()
        total += float(loss.detach()) / cfg.grad_accum
        run.tokens_seen += tokens.shape[0] * (tokens.shape[1] - 1)
    if not math.isfinite(total):
        raise FloatingPointError(f"non-finite loss {total} at step {step}; last good checkpoint is kept")
    gnorm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return total, float(gnorm)


def train(cfg: TrainConfig, run_dir: str | Path, *, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) in ``run_dir`` until cfg.steps, ``stop_after`` steps, or ``max_minutes``."""
    from tqdm.auto import tqdm

    run = _setup(cfg, Path(run_dir))
    start_step, t0 = run.step, time.perf_counter()
    budget = None if cfg.max_minutes is None else cfg.max_minutes * 60.0
    step_s, ckpt_s, eval_s, loss = 0.0, 0.0, 0.0, None
    logf = (run.run_dir / LOG_FILE).open("a")
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not cfg.progress, desc=f"train {cfg.mode}")
    try:
        while run.step < cfg.steps and (stop_after is None or run.step < stop_after):
            now = time.perf_counter() - t0
            if budget is not None and now + 2 * step_s + ckpt_s + eval_s + 5.0 > budget:
                log.info("time budget: stopping at step %d after %.0fs", run.step, now)
                break
            ts = time.perf_counter()
            loss, gnorm = train_step(run)
            run.step += 1
            step_s = (
                time.perf_counter() - ts if step_s == 0 else 0.9 * step_s + 0.1 * (time.perf_counter() - ts)
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            rec = _log_record(run, loss, gnorm, t0)
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.val_batches:
                te = time.perf_counter()
                run.val_loss = rec["val_loss"] = evaluate(run.model, run.val_batches, run.device, cfg.bf16)
                eval_s = time.perf_counter() - te
            if run.step % cfg.log_every == 0 or "val_loss" in rec or run.step == cfg.steps:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            if run.step % cfg.ckpt_every == 0:
                tc = time.perf_counter()
                save_checkpoint(run.run_dir, run.payload(time.perf_counter() - t0))
                ckpt_s = time.perf_counter() - tc
        evaluated_now = bool(cfg.eval_every) and run.step % cfg.eval_every == 0
        if (
            run.step >= cfg.steps and run.step > start_step and run.val_batches and not evaluated_now
        ):  # always end with a val loss
            run.val_loss = evaluate(run.model, run.val_batches, run.device, cfg.bf16)
            logf.write(json.dumps({"step": run.step, "val_loss": run.val_loss}) + "\n")
        save_checkpoint(run.run_dir, run.payload(time.perf_counter() - t0))
    finally:
        bar.close()
        logf.close()
    elapsed = run.elapsed_s + time.perf_counter() - t0
    return TrainResult(
        run.run_dir, run.step, run.step >= cfg.steps, loss, run.val_loss, run.tokens_seen, elapsed
    )


def _log_record(run: _Run, loss: float, gnorm: float, t0: float) -> dict[str, Any]:
    now = time.perf_counter() - t0
    return {
        "step": run.step,
        "loss": round(loss, 6),
        "lr": lr_at(run.step - 1, run.cfg),
        "ilr_scale": ilr_scale_at(run.step - 1, run.cfg) if run.cfg.mode in ("e2e", "frozen") else None,
        "grad_norm": round(gnorm, 4),
        "tokens": run.tokens_seen,
        "tokens_per_s": round(run.tokens_seen / max(now, 1e-9), 1) if run.step else None,
        "elapsed_s": round(run.elapsed_s + now, 2),
    }


def export(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the run's model as ``save_pretrained`` (safetensors in ``dtype``, config, tokenizer) + training.json."""
    run_dir, out = Path(run_dir), Path(out_dir)
    ck = torch.load(run_dir / CKPT_FILE, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**ck["config"])
    tok = Tokenizer.from_pretrained(cfg.data_dir)
    model = TTTModel(ModelConfig.from_dict(ck["model_config"]))
    model.load_state_dict(ck["model"])
    model.to(dtype).save_pretrained(out, tokenizer=tok)
    summary = {k: ck[k] for k in ("step", "tokens_seen", "elapsed_s", "val_loss")}
    summary.update(train_config=ck["config"], done=ck["step"] >= cfg.steps)
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    log.info("exported step %d of %s to %s", ck["step"], run_dir, out)
    return out
