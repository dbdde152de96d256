"""`ttt-rag train ...`: tokenizer, data (shards), pack (GPU carry), run (train/resume), export.

Imports of torch/tokenizers happen inside the commands so `ttt-rag --help` stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger(__name__)

train_app = typer.Typer(no_args_is_help=True, help="Tokenizer, data shards, (meta-)training and export.")


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """["d_model=256", "window=null"] -> {"d_model": 256, "window": None} (values parsed as JSON if possible)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


@train_app.command("tokenizer")
def tokenizer_cmd(
    corpus: Path = typer.Option(
        ..., help="corpus tarball, e.g. ../shared/data/corpus/gutenberg-top100-authors.tar.xz"
    ),
    out: Path = typer.Option(Path("data/tokenizer.json"), help="where to write tokenizer.json"),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary size (ids incl. 4 specials + 256 bytes)"),
    max_books: int | None = typer.Option(None, help="only the first N books (quick runs)"),
) -> None:
    """Train the byte-level BPE tokenizer on the TRAINING books only."""
    from ttt.data import DataConfig, train_tokenizer

    tok = train_tokenizer(corpus, vocab_size, DataConfig(max_books=max_books))
    tok.save(out)
    typer.echo(f"wrote {out} ({tok.vocab_size} ids, sha256 {tok.sha256()[:12]})")


@train_app.command("data")
def data_cmd(
    corpus: Path = typer.Option(..., help="corpus tarball"),
    out: Path = typer.Option(Path("data/full"), help="output shard dir"),
    tokenizer: Path | None = typer.Option(None, help="tokenizer.json (omit with --byte-level)"),
    byte_level: bool = typer.Option(False, help="use the untrained byte-level tokenizer (debug preset)"),
    synth_share: float = typer.Option(0.10, help="share of training tokens that are synthetic reading docs"),
    val_frac: float = typer.Option(0.025, help="share of books held out for validation"),
    min_val_books: int = typer.Option(8),
    shard_tokens: int = typer.Option(1 << 24),
    max_books: int | None = typer.Option(None),
    seed: int = typer.Option(0),
) -> None:
    """Tokenize the corpus into uint16 shards split by book (+ index.json, tokenizer.json)."""
    from ttt.data import DataConfig, build_shards
    from ttt.tokenizer import Tokenizer

    if (tokenizer is None) == (not byte_level):
        raise typer.BadParameter("give exactly one of --tokenizer PATH or --byte-level")
    tok = Tokenizer.byte_level() if byte_level else Tokenizer.from_file(tokenizer)  # type: ignore[arg-type]
    cfg = DataConfig(
        val_frac=val_frac, min_val_books=min_val_books, shard_tokens=shard_tokens,
        synth_share=synth_share, seed=seed, max_books=max_books,
    )  # fmt: skip
    index = build_shards(corpus, out, tok, cfg)
    for s, d in index["splits"].items():
        typer.echo(f"{s}: {d['books']} books, {d['tokens']:,} tokens ({d['synth_tokens']:,} synthetic)")


@train_app.command("pack")
def pack_cmd(
    data: Path = typer.Option(Path("data/full"), help="shard dir from `train data`"),
    out: Path = typer.Option(Path("data/packed"), help="output dir (carry this to the GPU)"),
    max_mib: float = typer.Option(30.0, help="size budget of all packed shards"),
    max_val_tokens: int = typer.Option(2_000_000),
) -> None:
    """Copy a hash-random subset of whole training books + validation into <= max_mib."""
    from ttt.data import pack_shards

    index = pack_shards(data, out, max_mib=max_mib, max_val_tokens=max_val_tokens)
    for s, d in index["splits"].items():
        typer.echo(f"{s}: {d['books']} books, {d['tokens']:,} tokens")


@train_app.command("run")
def run_cmd(
    data: Path = typer.Option(..., help="shard dir (packed or full)"),
    run_dir: Path = typer.Option(..., help="checkpoints + log; rerun the same command to resume"),
    mode: str = typer.Option("e2e", help="e2e (meta_loss) | frozen (TTT model, update off) | fa | swa"),
    model: str = typer.Option("debug", help="ModelConfig preset"),
    set_: list[str] = typer.Option([], "--set", help="model override key=value (JSON value), repeatable"),
    seq_len: int = typer.Option(1024),
    batch_size: int = typer.Option(8),
    grad_accum: int = typer.Option(1),
    steps: int = typer.Option(1000),
    lr: float = typer.Option(3e-3),
    inner_checkpoint: bool = typer.Option(False, help="recompute TTT chunks in backward (less memory)"),
    init_from: Path | None = typer.Option(None, help="start from an exported model dir (fresh optimizer)"),
    max_minutes: float | None = typer.Option(None, help="stop + checkpoint before this wall time"),
    ckpt_every: int = typer.Option(100),
    eval_every: int = typer.Option(100),
    eval_batches: int = typer.Option(4),
    log_every: int = typer.Option(10),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    no_progress: bool = typer.Option(False, help="no tqdm bar"),
) -> None:
    """Train (or resume) a TTT-E2E model or an FA/SWA control."""
    from ttt.train import TrainConfig, train

    cfg = TrainConfig(
        data_dir=str(data), model=model, model_overrides=_parse_sets(set_), mode=mode, seq_len=seq_len,
        batch_size=batch_size, grad_accum=grad_accum, steps=steps, lr=lr, inner_checkpoint=inner_checkpoint,
        init_from=str(init_from) if init_from else None,
        max_minutes=max_minutes, ckpt_every=ckpt_every, eval_every=eval_every, eval_batches=eval_batches,
        log_every=log_every, seed=seed, device=device, progress=not no_progress,
    )  # fmt: skip
    res = train(cfg, run_dir)
    state = "done" if res.done else "paused (rerun the same command to resume)"
    typer.echo(
        f"step {res.step}/{steps} {state}; train loss {res.train_loss}; val loss {res.val_loss}; "
        f"tokens {res.tokens_seen:,}; elapsed {res.elapsed_s:.0f}s"
    )


@train_app.command("export")
def export_cmd(
    run_dir: Path = typer.Option(..., help="run dir holding ckpt.pt"),
    out: Path = typer.Option(..., help="model dir to write (model.safetensors, config.json, tokenizer.json)"),
    fp32: bool = typer.Option(False, help="keep fp32 weights (default bf16)"),
) -> None:
    """Export the run's latest checkpoint with save_pretrained (bf16 safetensors by default)."""
    import torch

    from ttt.train import export

    path = export(run_dir, out, dtype=torch.float32 if fp32 else torch.bfloat16)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    typer.echo(f"wrote {path} ({size:.1f} MiB)")


def register(app: typer.Typer) -> None:
    """Add `ttt-rag train ...` to the root app."""
    app.add_typer(train_app, name="train", help="Tokenizer, data shards, (meta-)training and export.")
