"""Loss vs context length on held-out books (``ttt-e2e.md`` §4.1, the paper's Fig. 6), TTT-E2E vs FA vs SWA.

Protocol: draw ``n_seqs`` windows of ``max(contexts) + 1`` tokens from inside held-out (validation) books
(seeded; a window never crosses a book boundary). For each context length T (each must divide the longest),
every window is cut into pieces of T + 1 tokens overlapping by one, so all context lengths score the SAME
target tokens and differ only in how much context precedes each one. Per model:
  - TTT-E2E (n_ttt_layers > 0): ``model.prefill(piece).token_nll`` (fresh fast weights per piece, inner lr 1);
  - FA / SWA: next-token NLL of one plain forward ``model(piece[:-1])``.
Reported: mean NLL per context length (over all targets) and the per-position mean NLL curve (binned).
Outputs: ``<name>.json`` (run metadata + numbers), ``<name>.png`` and ``<name>.md`` under ``eval/results/``.

CLI: ``ttt-rag eval loss --model e2e=models/ttt-e2e-ref --model fa=models/fa-ref --data data/packed``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import RESULTS_DIR, run_metadata, write_results

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LossVsContextConfig:
    """What to evaluate; ``contexts=None`` means window * (1/2, 1, 2, 4, 8) of the first windowed model."""

    models: dict[str, str]  # label -> checkpoint dir (TTTModel.from_pretrained)
    data_dir: str  # shards dir with a "val" split (held-out books)
    contexts: list[int] | None = None
    n_seqs: int = 8  # windows of max(contexts) + 1 tokens
    batch_size: int = 4
    bins: int = 64  # the per-position curve is averaged into at most this many bins
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # autocast on CUDA only; CPU runs fp32
    name: str = "loss_vs_context"
    out_dir: str | None = None  # default eval/results/
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("give at least one model: {label: model_dir}")
        if self.n_seqs < 1 or self.batch_size < 1:
            raise ValueError("n_seqs and batch_size must be >= 1")


def held_out_windows(data_dir: str | Path, length: int, n: int, seed: int = 0) -> np.ndarray:
    """(n, length + 1) int64 windows from inside validation books, book chosen by length-weighted sampling."""
    from ttt.data import TokenStream

    stream = TokenStream(data_dir, "val")
    books = [b for b in stream.index["books"] if b["split"] == "val" and b["end"] - b["start"] >= length + 1]
    if not books:
        longest = max(
            (b["end"] - b["start"] for b in stream.index["books"] if b["split"] == "val"), default=0
        )
        raise ValueError(
            f"no validation book holds {length + 1} tokens (longest {longest}); use shorter contexts"
        )
    rng = np.random.default_rng(seed)
    room = np.array([b["end"] - b["start"] - length for b in books], dtype=np.float64)
    rows = []
    for k in rng.choice(len(books), size=n, p=room / room.sum()):
        start = books[k]["start"] + int(rng.integers(0, room[k]))
        rows.append(stream.slice(start, start + length + 1).astype(np.int64))
    return np.stack(rows)


def pieces(windows: np.ndarray, T: int) -> np.ndarray:
    """(n, L + 1) -> (n * L / T, T + 1): consecutive pieces overlapping by one token (same targets)."""
    n, L1 = windows.shape
    L = L1 - 1
    assert L % T == 0, f"context {T} must divide the longest context {L}"
    idx = np.arange(L // T)[:, None] * T + np.arange(T + 1)[None, :]  # (L/T, T+1)
    return windows[:, idx].reshape(-1, T + 1)


def model_nll(model: Any, tokens: np.ndarray, batch_size: int, device: Any, bf16: bool) -> np.ndarray:
    """(N, T + 1) tokens -> (N, T) float64 NLL of tokens[:, 1:] (TTT via prefill, others one forward)."""
    import torch

    from ttt.train import _autocast, token_nll

    out = []
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            x = torch.from_numpy(tokens[i : i + batch_size]).to(device)
            with _autocast(device, bf16):
                out.append(token_nll(model, x).double().cpu().numpy())
    return np.concatenate(out)


def _binned(curve: np.ndarray, bins: int) -> tuple[list[float], list[int]]:
    edges = np.unique(np.linspace(0, len(curve), min(bins, len(curve)) + 1).astype(int))
    means = [float(curve[a:b].mean()) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return means, [int(b) for b in edges[1:]]  # bin i covers positions [edges[i], edges[i+1])


def _kind(cfg: Any) -> str:
    return "ttt-e2e" if cfg.n_ttt_layers > 0 else ("fa" if cfg.window is None else "swa")


def _contexts(cfg: LossVsContextConfig, windows: list[int | None]) -> list[int]:
    if cfg.contexts:
        return sorted(cfg.contexts)
    w = next((x for x in windows if x), None)
    if w is None:
        raise ValueError("no model has a sliding window; pass contexts explicitly")
    return [w // 2, w, 2 * w, 4 * w, 8 * w]


def evaluate_models(cfg: LossVsContextConfig) -> dict[str, Any]:
    """Run the protocol above; return the results payload (also written to disk with a PNG and markdown)."""
    import torch

    from ttt.model import TTTModel
    from ttt.train import _resolve_device

    device = _resolve_device(cfg.device)
    models = {
        k: TTTModel.from_pretrained(v, device=device, dtype=torch.float32).eval()
        for k, v in cfg.models.items()
    }
    contexts = _contexts(cfg, [m.cfg.window for m in models.values()])
    windows = held_out_windows(cfg.data_dir, contexts[-1], cfg.n_seqs, cfg.seed)
    results: dict[str, Any] = {}
    for label, model in models.items():
        res: dict[str, Any] = {
            "dir": cfg.models[label],
            "kind": _kind(model.cfg),
            "config": model.cfg.to_dict(),
        }
        res["mean_loss"], res["per_position"] = {}, {}
        for T in contexts:
            nll = model_nll(model, pieces(windows, T), cfg.batch_size, device, cfg.bf16)  # (N, T)
            res["mean_loss"][str(T)] = float(nll.mean())
            means, ends = _binned(nll.mean(axis=0), cfg.bins)
            res["per_position"][str(T)] = {"bin_end": ends, "nll": means}
            log.info("%s T=%d mean NLL %.4f", label, T, res["mean_loss"][str(T)])
        results[label] = res
    payload = run_metadata(asdict(cfg), cfg.seed)
    payload.update(
        contexts=contexts, n_seqs=cfg.n_seqs, target_tokens=int(cfg.n_seqs * contexts[-1]), models=results
    )
    out_dir = Path(cfg.out_dir) if cfg.out_dir else RESULTS_DIR
    write_results(cfg.name, payload, out_dir)
    plot(payload, out_dir / f"{cfg.name}.png")
    (out_dir / f"{cfg.name}.md").write_text(summary_markdown(payload))
    return payload


def summary_markdown(payload: dict[str, Any]) -> str:
    """Markdown table: mean NLL per model and context length, plus the difference to FA when present."""
    ctx = payload["contexts"]
    models = payload["models"]
    lines = [
        f"Loss vs context on held-out books: {payload['n_seqs']} windows, {payload['target_tokens']} target "
        f"tokens per column (git {payload['git_sha']}, {payload['timestamp']}).",
        "",
        "| model | kind | window | " + " | ".join(f"T={t}" for t in ctx) + " |",
        "|---|---|---|" + "---|" * len(ctx),
    ]
    for label, r in models.items():
        vals = " | ".join(f"{r['mean_loss'][str(t)]:.4f}" for t in ctx)
        lines.append(f"| {label} | {r['kind']} | {r['config']['window']} | {vals} |")
    fa = next((r for r in models.values() if r["kind"] == "fa"), None)
    if fa is not None:
        lines += ["", "Difference to FA (negative = better than full attention):", ""]
        for label, r in models.items():
            if r is not fa:
                d = " | ".join(f"{r['mean_loss'][str(t)] - fa['mean_loss'][str(t)]:+.4f}" for t in ctx)
                lines.append(f"| {label} | {r['kind']} | | {d} |")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    """Two panels: per-position NLL at the longest context, and mean NLL vs context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ctx = payload["contexts"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in payload["models"].items():
        pp = r["per_position"][str(ctx[-1])]
        a.plot(pp["bin_end"], pp["nll"], label=f"{label} ({r['kind']})")
        b.plot(ctx, [r["mean_loss"][str(t)] for t in ctx], marker="o", label=label)
    windows = {r["config"]["window"] for r in payload["models"].values()} - {None}
    for w in windows:
        a.axvline(w, ls="--", c="gray", lw=0.8)
    a.set(xscale="log", xlabel="token position", ylabel="NLL (nats)", title=f"per-position loss, T={ctx[-1]}")
    b.set(xscale="log", xlabel="context length T", ylabel="mean NLL (nats)", title="mean loss vs context")
    b.set_xticks(ctx, [str(t) for t in ctx])
    b.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
