"""`ttt-rag eval ...` subcommands, one module per evaluation."""

from __future__ import annotations

import typer

from cli import eval_loss, eval_niah, eval_router

app = typer.Typer(no_args_is_help=True)

eval_niah.register(app)  # eval niah
eval_loss.register(app)  # eval loss
eval_router.register(app)  # eval router
