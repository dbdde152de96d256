"""`ttt-rag convert-hf SRC DST`: import a local Hugging Face Llama checkpoint into a ttt-rag checkpoint dir."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @app.command("convert-hf")
    def convert_hf(
        src: Path = typer.Argument(
            ..., help="Local Hugging Face LlamaForCausalLM dir (config.json + *.safetensors)."
        ),
        dst: Path = typer.Argument(
            ..., help="Output checkpoint dir (model.safetensors, config.json, tokenizer.json)."
        ),
        n_ttt_layers: int = typer.Option(
            0, help="Add prime (fast-weight) MLPs to the last N blocks (w2 = 0: no-op at start)."
        ),
        window: int = typer.Option(
            0, help="Sliding window k (0 = keep the checkpoint's: full attention for Llama)."
        ),
        ttt_chunk: int = typer.Option(1024, help="Tokens per inner SGD step (b)."),
        ttt_lr: float = typer.Option(1.0, help="Inner SGD learning rate."),
    ) -> None:
        """Convert a Hugging Face Llama checkpoint; copies tokenizer.json when SRC has one."""
        import shutil

        from ttt import TTTModel

        overrides: dict = dict(n_ttt_layers=n_ttt_layers, ttt_chunk=ttt_chunk, ttt_lr=ttt_lr)
        if window > 0:
            overrides["window"] = window
        try:
            model = TTTModel.from_hf(src, **overrides)
        except (FileNotFoundError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="SRC") from e
        model.save_pretrained(dst)
        if (src / "tokenizer.json").is_file():
            shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
        else:
            log.warning("%s has no tokenizer.json; add one to %s before serving", src, dst)
        n = sum(p.numel() for p in model.parameters())
        typer.echo(f"wrote {dst} ({n / 1e6:.1f}M parameters, {model.cfg.n_ttt_layers} TTT blocks)")
