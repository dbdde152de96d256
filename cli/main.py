"""Entry point of the `ttt-rag` command.

Each area registers its subcommands from its own module (``cli/rag.py``, ``cli/train.py``, ...).
Those modules import heavy libraries (torch, faiss, fastapi) only inside command bodies, so
``ttt-rag --help`` stays fast.
"""

from __future__ import annotations

import logging

import typer

from cli import bench, convert, evaluate, rag, serve, train

app = typer.Typer(
    name="ttt-rag",
    help="Hybrid RAG over large corpora: TTT-E2E corpus memory + exact BM25/dense retrieval.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


rag.register(app)  # demo, ingest, ask
train.register(app)  # train
serve.register(app)  # serve
bench.register(app)  # bench
convert.register(app)  # convert-hf
app.add_typer(evaluate.app, name="eval", help="Evaluations: NIAH, loss vs context, router.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
