"""`ttt-rag eval niah`: RULER NIAH tasks + gkamradt depth x length grid over every system."""

from __future__ import annotations

import typer

QUICK = dict(
    tasks="s-niah-1,mk-niah-2,lowlex-niah", systems="ttt,swa,full,bm25,regex", lengths="512,1024",
    depths="0,100", samples=1, max_new_tokens=8,
)  # fmt: skip
DEFAULT_TASKS = "s-niah-1,s-niah-2,s-niah-3,mk-niah-1,mk-niah-2,mk-niah-3,mv-niah,mq-niah"
_DEFAULTS = dict(
    tasks=DEFAULT_TASKS, systems="ttt,swa,full,retrieval,bm25,dense,regex,hybrid,fused",
    lengths="4096,8192,16384,32768", depths="0,10,20,30,40,50,60,70,80,90,100", samples=5, max_new_tokens=128,
)  # fmt: skip


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"expected comma-separated integers, got {s!r}") from e


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"expected comma-separated numbers, got {s!r}") from e


def register(app: typer.Typer) -> None:
    """Add ``niah`` to the ``eval`` sub-app."""

    @app.command("niah")
    def niah(
        tasks: str = typer.Option(
            DEFAULT_TASKS,
            help="Comma list: RULER s-niah-1..3 mk-niah-1..3 mv-niah "
            "mq-niah, gk-niah (SF needle), lowlex-niah, custom.",
        ),
        systems: str = typer.Option(_DEFAULTS["systems"], help="Comma list."),
        lengths: str = typer.Option(_DEFAULTS["lengths"], help="Prompt lengths in model tokens."),
        depths: str = typer.Option(_DEFAULTS["depths"], help="Needle depths (percent)."),
        samples: int = typer.Option(5, help="Samples per (task, length, depth) cell."),
        seed: int = typer.Option(42),
        out: str = typer.Option("eval/results/niah", help="Output dir (records.jsonl, results.json, PNGs)."),
        model: str = typer.Option(None, help="Checkpoint dir; default: a random-init debug model (smoke)."),
        full_model: str = typer.Option(
            None, help="Separate full-attention checkpoint for the `full` system."
        ),
        needles: str = typer.Option(None, help="JSONL of custom needles {needle, question, answer}."),
        haystack: str = typer.Option(None, help="Essay dir (default ../shared/data/haystack/pg_essays)."),
        device: str = typer.Option("cpu", help="cpu | cuda"),
        dtype: str = typer.Option("float32", help="float32 | bfloat16"),
        max_new_tokens: int = typer.Option(128, help="Generation cap, identical for all systems."),
        top_k: int = typer.Option(5, help="Retrieved chunks."),
        max_full_len: int = typer.Option(None, help="Skip `full` above this prompt length."),
        embedder: str = typer.Option(
            None,
            help="Sentence-transformers dir for dense/hybrid (e.g. an int8 export); default: the package.",
        ),
        budget_s: float = typer.Option(None, help="Start no new sample after this many seconds (resumable)."),
        interleave: bool = typer.Option(
            False, help="Coverage order (index, depth, length, task) so a time-boxed run spreads evenly."
        ),
        chat_template: str = typer.Option(
            "base", help="How ttt/swa/full/retrieval wrap RULER's input: base | reader (adds '\\nAnswer:')."
        ),
        quick: bool = typer.Option(False, help="A CPU smoke run of a few minutes on the debug model."),
        progress: bool = typer.Option(True, help="Progress bar."),
    ) -> None:
        """NIAH accuracy per system x task x length x depth; resumable via OUT/records.jsonl."""
        from eval.niah.runner import RunConfig, run
        from eval.niah.systems import CHAT_TEMPLATES, SystemsConfig

        if chat_template not in CHAT_TEMPLATES:
            raise typer.BadParameter(
                f"unknown chat template {chat_template!r}; choose from {list(CHAT_TEMPLATES)}"
            )

        if quick:  # quick values replace options left at their defaults
            given = dict(tasks=tasks, systems=systems, lengths=lengths, depths=depths, samples=samples,
                         max_new_tokens=max_new_tokens)  # fmt: skip
            q = {k: (QUICK[k] if v == _DEFAULTS[k] else v) for k, v in given.items()}
            tasks, systems, lengths, depths = q["tasks"], q["systems"], q["lengths"], q["depths"]
            samples, max_new_tokens = int(q["samples"]), int(q["max_new_tokens"])
            from eval.niah.haystack import default_essay_dir
            from eval.niah.tasks import TASKS

            if haystack is None and default_essay_dir() is None:  # a clone without ../shared: no essays
                tasks = ",".join(t for t in tasks.split(",") if TASKS[t].haystack != "essay")
        cfg = RunConfig(
            tasks=[t.strip() for t in tasks.split(",") if t.strip()],
            systems=[s.strip() for s in systems.split(",") if s.strip()],
            lengths=_ints(lengths), depths=_floats(depths), samples=samples, seed=seed, out=out,
            haystack=haystack, needles=needles, progress=progress, budget_s=budget_s, interleave=interleave,
            sys=SystemsConfig(
                model_dir=model, full_model_dir=full_model, device=device, dtype=dtype,
                max_new_tokens=max_new_tokens, top_k=top_k, max_full_len=max_full_len, seed=seed,
                embedder_dir=embedder, chat_template=chat_template,
            ),
        )  # fmt: skip
        try:
            res = run(cfg)
        except (ValueError, FileNotFoundError) as e:
            raise typer.BadParameter(str(e)) from e
        typer.echo(f"wrote {out}/results.json, summary.md and {len(res['plots'])} plots")
