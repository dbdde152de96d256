"""`ttt-rag eval loss`: loss vs context length on held-out books (TTT-E2E vs FA vs SWA)."""

from __future__ import annotations

from pathlib import Path

import typer


def loss_cmd(
    model: list[str] = typer.Option(..., help="label=model_dir, repeatable (e.g. e2e=models/ttt-e2e-ref)"),
    data: Path = typer.Option(..., help="shard dir with a val split (e.g. data/packed)"),
    contexts: str | None = typer.Option(None, help="comma-separated lengths; default window x 1/2,1,2,4,8"),
    n_seqs: int = typer.Option(8, help="windows of the longest context"),
    batch_size: int = typer.Option(4),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    name: str = typer.Option("loss_vs_context", help="results file stem"),
    out_dir: Path | None = typer.Option(None, help="default eval/results/"),
) -> None:
    """Per-position and mean NLL vs context length; writes JSON + PNG + markdown."""
    from eval.loss_vs_context import LossVsContextConfig, evaluate_models

    models = {}
    for item in model:
        if "=" not in item:
            raise typer.BadParameter(f"--model expects label=dir, got {item!r}")
        label, d = item.split("=", 1)
        models[label] = d
    cfg = LossVsContextConfig(
        models=models, data_dir=str(data), n_seqs=n_seqs, batch_size=batch_size, seed=seed, device=device,
        contexts=[int(c) for c in contexts.split(",")] if contexts else None, name=name,
        out_dir=str(out_dir) if out_dir else None,
    )  # fmt: skip
    payload = evaluate_models(cfg)
    from eval.loss_vs_context import summary_markdown

    typer.echo(summary_markdown(payload))


def register(app: typer.Typer) -> None:
    """Add `loss` to the `ttt-rag eval` sub-app."""
    app.command("loss")(loss_cmd)
