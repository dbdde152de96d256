"""`ttt-rag eval router`: router accuracy, confusion matrix and ECE on the held-out split."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the `router` command to the `eval` sub-app."""

    @app.command("router")
    def router_cmd(
        router_dir: Path = typer.Option(None, help="Saved router dir (default: the shipped router)."),
        data: Path = typer.Option(None, help="Labelled JSONL (default: router/data/router_examples.jsonl)."),
        split: str = typer.Option("test", help="Which split of the JSONL to evaluate."),
        out_dir: Path = typer.Option(None, help="Results dir (default: eval/results/)."),
    ) -> None:
        """Evaluate the router; writes eval/results/router_eval.json and prints a markdown table."""
        from eval.router_eval import run

        result = run(router_dir, data, split, out_dir)
        typer.echo(result["markdown"])
        typer.echo(f"wrote {result['path']}")
