"""`ttt-rag demo | ingest | ask`: thin wrappers over ``hybrid.HybridRAG`` (heavy imports inside commands)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import typer

DEMO_QUESTIONS = (
    "Summarize the main themes of these stories.",  # the router sends this to comprehension
    "How many francs did the donkey Modestine cost?",  # ... and this to lookup
)
_TEXT_SUFFIXES = {".txt", ".md", ".rst"}


def _read_paths(paths: list[Path]) -> list[tuple[str, str]]:
    """(doc_id, text) for every text file given or found under the given directories (sorted)."""
    files: list[tuple[str, Path]] = []
    for p in paths:
        if p.is_dir():
            files += [(str(f.relative_to(p)), f) for f in sorted(p.rglob("*")) if f.suffix in _TEXT_SUFFIXES]
        elif p.is_file():
            files.append((p.name, p))
        else:
            raise typer.BadParameter(f"{p} does not exist")
    if not files:
        raise typer.BadParameter(f"no text files ({', '.join(sorted(_TEXT_SUFFIXES))}) under {paths}")
    return [(doc_id, f.read_text(encoding="utf-8", errors="replace")) for doc_id, f in files]


def _fmt_secs(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())


def _print_answer(ans: Any, max_sources: int = 4) -> None:
    d = ans.decision
    typer.echo(f"route: {ans.route} (confidence {d.confidence:.2f}; {d.reason})")
    if ans.memory_rebuilt:
        typer.echo("note: the corpus memory was stale and has been rebuilt for this answer")
    typer.echo(f"answer: {ans.text!r}")
    for s in ans.sources[:max_sources]:
        mark = "cited" if s.cited else "retrieved"
        snippet = " ".join(s.text.split())[:100]
        typer.echo(
            f"  [{s.marker}] {s.doc_id} ({mark}, score {s.score:.3f}) chars {s.start}-{s.end}: {snippet}..."
        )
    typer.echo(f"timings: {_fmt_secs(ans.timings)}")
    typer.echo(f"usage: {ans.usage}")


def _open(model: Path | None, store: Path, dense: bool = True) -> Any:
    import torch

    from hybrid.rag import HybridRAG

    if not torch.cuda.is_available():
        try:  # faiss's OpenMP threads spin against torch's on a small CPU box (~40x slower decoding)
            import faiss

            faiss.omp_set_num_threads(1)
        except ImportError:
            pass
    return HybridRAG.from_pretrained(model, store, dense=dense)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @app.command()
    def ingest(
        paths: list[Path] = typer.Argument(..., help="Text files or directories (*.txt, *.md, *.rst)."),
        store: Path = typer.Option(..., "--store", help="Store dir (created if absent)."),
        model: Path | None = typer.Option(None, "--model", help="Model dir (default: the shipped model)."),
        dense: bool = typer.Option(True, "--dense/--no-dense", help="Dense (MiniLM + FAISS) next to BM25."),
    ) -> None:
        """Index documents and let the TTT model read them (continues the store's corpus memory)."""
        docs = _read_paths(paths)
        rag = _open(model, store, dense)
        rep = rag.ingest(docs, progress=True)
        typer.echo(
            f"ingested {len(rep.doc_ids)} documents, {rep.chunks} chunks, read {rep.tokens_read} tokens; "
            f"memory v{rep.version}{' (rebuilt)' if rep.memory_rebuilt else ''}; {_fmt_secs(rep.timings)}"
        )

    @app.command()
    def ask(
        question: str = typer.Argument(..., help="The question."),
        store: Path = typer.Option(..., "--store", help="Store dir filled by `ttt-rag ingest`."),
        model: Path | None = typer.Option(None, "--model", help="Model dir (the one used to ingest)."),
        route: str = typer.Option("auto", "--route", help="auto | comprehension | lookup | fused."),
        top_k: int = typer.Option(4, "--top-k", min=1, help="Chunks retrieved for lookup/fused."),
        max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens to generate."),
        as_json: bool = typer.Option(False, "--json", help="Print the answer as JSON."),
    ) -> None:
        """Answer a question: prints the answer, route + confidence + reason, sources and timings."""
        from hybrid.errors import HybridError

        if not (store / "manifest.json").exists():
            raise typer.BadParameter(
                f"{store} holds no index: run `ttt-rag ingest PATHS --store {store}` first"
            )
        rag = _open(model, store)
        try:
            ans = rag.answer(question, route=route, top_k=top_k, max_new_tokens=max_tokens)
        except HybridError as e:
            raise typer.BadParameter(str(e)) from e
        if as_json:
            typer.echo(json.dumps(ans.to_dict(), indent=2))
        else:
            _print_answer(ans)

    @app.command()
    def demo(
        model: Path | None = typer.Option(None, "--model", help="Model dir (default: the shipped model)."),
        store: Path | None = typer.Option(None, "--store", help="Store dir (default: a temp dir)."),
        max_tokens: int = typer.Option(48, "--max-tokens", min=1, help="Tokens to generate per answer."),
    ) -> None:
        """Ingest the bundled public-domain sample, then answer a comprehension and a lookup question."""
        import importlib.resources as res

        data = res.files("hybrid") / "data"
        docs = sorted(
            (f.name, f.read_text(encoding="utf-8")) for f in data.iterdir() if f.name.endswith(".txt")
        )
        store = store or Path(tempfile.mkdtemp(prefix="ttt-rag-demo-"))
        typer.echo(f"store: {store}")
        rag = _open(model, store)
        rep = rag.ingest(docs, progress=True)
        typer.echo(
            f"ingested {len(rep.doc_ids)} documents ({', '.join(rep.doc_ids)}): {rep.chunks} chunks, "
            f"the model read {rep.tokens_read} tokens into memory v{rep.version}; {_fmt_secs(rep.timings)}"
        )
        for q in DEMO_QUESTIONS:
            typer.echo(f"\nQ: {q}")
            _print_answer(rag.answer(q, route="auto", max_new_tokens=max_tokens), max_sources=3)
