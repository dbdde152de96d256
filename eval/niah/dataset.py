"""Build NIAH samples: plan needles and question for a task, size the haystack to the target token length,
place the needles by token depth on segment boundaries, and record where the answer landed (in tokens)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from eval.niah.haystack import Corpus, TokenizerLike, boundary_for_depth, fit_units, insert_at_boundaries
from eval.niah.tasks import (
    CUSTOM_PREFIX,
    CUSTOM_TEMPLATE,
    GK_ANSWERS,
    GK_NEEDLE,
    GK_PREFILL,
    GK_QUESTION,
    GK_TEMPLATE,
    LOWLEX_ADJ,
    LOWLEX_NEEDLE,
    LOWLEX_NOUN,
    LOWLEX_PREFIX,
    LOWLEX_QUESTION,
    LOWLEX_TEMPLATE,
    RULER_NEEDLE,
    CustomNeedle,
    Sample,
    TaskSpec,
    gen_random,
    ruler_render,
)

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class _Plan:
    """A sample before its haystack is sized: needles (queried first) with their depths, and the prompt."""

    needles: list[tuple[str, float]]  # (sentence, depth %); needles[0] is placed at the requested depth
    n_queried: int
    outputs: list[str]
    render: Callable[[str], tuple[str, str]]  # context -> (input, answer_prefix)
    line_gen: Callable[[], str] | None = None  # distractor-needle lines (``needle`` haystack only)


def _ruler_plan(spec: TaskSpec, rng: random.Random, depth: float) -> _Plan:
    keys: list[str] = []
    values: list[list[str]] = []
    for _ in range(spec.num_k):
        key = gen_random(spec.type_k, rng)
        while key in keys:
            key = gen_random(spec.type_k, rng)
        keys.append(key)
        values.append([gen_random(spec.type_v, rng) for _ in range(spec.num_v)])
    queried = rng.sample(range(spec.num_k), spec.num_q)
    q_keys = [keys[i] for i in queried]
    query = ", ".join(q_keys[:-1]) + ", and " + q_keys[-1] if len(q_keys) > 1 else q_keys[0]
    fmt = RULER_NEEDLE.format
    order = queried + [i for i in range(spec.num_k) if i not in queried]
    sentences = [fmt(type_needle_v=spec.type_v, key=keys[i], value=v) for i in order for v in values[i]]
    n_q = spec.num_q * spec.num_v
    depths = [depth] + [rng.uniform(0.0, 100.0) for _ in sentences[1:]]
    line_gen = None
    if spec.haystack == "needle":

        def line_gen() -> str:
            k = gen_random(spec.type_k, rng)
            while k in keys:
                k = gen_random(spec.type_k, rng)
            return fmt(type_needle_v=spec.type_v, key=k, value=gen_random(spec.type_v, rng))

    return _Plan(
        needles=list(zip(sentences, depths, strict=True)),
        n_queried=n_q,
        outputs=[v for i in queried for v in values[i]],
        render=lambda ctx: ruler_render(spec, ctx, query),
        line_gen=line_gen,
    )


def _lowlex_plan(spec: TaskSpec, rng: random.Random, depth: float) -> _Plan:
    adjs = rng.sample(LOWLEX_ADJ, spec.num_k)
    nouns = rng.sample(LOWLEX_NOUN, spec.num_k)
    swap = [(rng.random() < 0.5, rng.random() < 0.5) for _ in range(spec.num_k)]
    values = [gen_random("numbers", rng) for _ in range(spec.num_k)]
    sentences, question = [], ""
    for i, ((a0, a1), (n0, n1), (sa, sn)) in enumerate(zip(adjs, nouns, swap, strict=True)):
        a_needle, a_q = (a1, a0) if sa else (a0, a1)
        n_needle, n_q = (n1, n0) if sn else (n0, n1)
        sentences.append(LOWLEX_NEEDLE.format(adj=a_needle, noun=n_needle, value=values[i]))
        if i == 0:
            question = LOWLEX_QUESTION.format(adj=a_q, noun=n_q)
    depths = [depth] + [rng.uniform(0.0, 100.0) for _ in sentences[1:]]
    return _Plan(
        needles=list(zip(sentences, depths, strict=True)),
        n_queried=1,
        outputs=[values[0]],
        render=lambda ctx: (LOWLEX_TEMPLATE.format(context=ctx, question=question), LOWLEX_PREFIX),
    )


def plan_sample(spec: TaskSpec, rng: random.Random, depth: float, custom: CustomNeedle | None) -> _Plan:
    if spec.family == "ruler":
        return _ruler_plan(spec, rng, depth)
    if spec.family == "lowlex":
        return _lowlex_plan(spec, rng, depth)
    if spec.family == "gkamradt":
        return _Plan(
            needles=[(GK_NEEDLE, depth)],
            n_queried=1,
            outputs=list(GK_ANSWERS),
            render=lambda ctx: (GK_TEMPLATE.format(context=ctx, question=GK_QUESTION), GK_PREFILL),
        )
    if spec.family == "custom":
        if custom is None:
            raise ValueError("task 'custom' needs a needle file (--needles FILE)")
        return _Plan(
            needles=[(custom.needle, depth)],
            n_queried=1,
            outputs=list(custom.answer),
            render=lambda ctx: (CUSTOM_TEMPLATE.format(context=ctx, question=custom.question), CUSTOM_PREFIX),
        )
    raise ValueError(f"unknown task family {spec.family!r}")


def _question_of(spec: TaskSpec, inp: str, custom: CustomNeedle | None) -> str:
    if spec.family == "gkamradt":
        return GK_QUESTION
    if spec.family == "custom" and custom is not None:
        return custom.question
    return inp.rstrip().rsplit("\n", 1)[-1]  # RULER / lowlex: the question is the last line of the input


def _segments_fn(
    spec: TaskSpec, corpus: Corpus | None, plan: _Plan
) -> tuple[Callable[[int], list[str]], str]:
    """``n units -> haystack segments`` and the joiner, for the task's haystack kind."""
    if spec.haystack == "needle":
        assert plan.line_gen is not None, "needle haystack without a distractor generator"
        lines: list[str] = []

        def lines_upto(n: int) -> list[str]:
            while len(lines) < n:  # one RNG stream: the first n lines never depend on how many were asked
                lines.append(plan.line_gen())
            return lines[:n]

        return lines_upto, "\n"
    assert corpus is not None, f"task {spec.name} needs a {spec.haystack} corpus"
    return (lambda n: corpus.segments(corpus.pieces(n))), corpus.joiner


def _assemble(
    plan: _Plan, segs: list[str], joiner: str, seg_tokens: Sequence[int] | None
) -> tuple[str, str, list[int], str]:
    """Insert needles; returns (input, answer_prefix, char offsets of the queried needles in input, context)."""
    if seg_tokens is None:  # cheap placement for sizing: by segment count
        bounds = [min(len(segs), int(len(segs) * d / 100.0)) for _, d in plan.needles]
    else:
        bounds = [boundary_for_depth(seg_tokens, d) for _, d in plan.needles]
    parts = insert_at_boundaries(segs, [(b, s) for b, (s, _) in zip(bounds, plan.needles, strict=True)])
    context = joiner.join(parts)
    inp, prefix = plan.render(context)
    offsets = [inp.find(s) for s, _ in plan.needles[: plan.n_queried]]
    assert all(o >= 0 for o in offsets), "a queried needle is missing from the rendered prompt"
    return inp, prefix, offsets, context


def _token_lengths(tokenizer: TokenizerLike, texts: list[str]) -> list[int]:
    batch = getattr(tokenizer, "encode_batch", None)  # ttt.tokenizer.Tokenizer: one Rust call
    if batch is not None and texts:
        return [len(ids) for ids in batch(texts)]
    return [len(tokenizer.encode(t)) for t in texts]


def build_sample(
    spec: TaskSpec,
    *,
    tokenizer: TokenizerLike,
    target_length: int,
    depth: float,
    index: int,
    seed: int,
    corpus: Corpus | None = None,
    custom: Sequence[CustomNeedle] = (),
    guess: int | None = None,
) -> Sample:
    """One sample whose prompt has at most ``target_length`` tokens (the largest haystack that fits)."""
    rng = random.Random(f"{seed}|{spec.name}|{target_length}|{depth}|{index}")
    needle = custom[index % len(custom)] if custom else None
    plan = plan_sample(spec, rng, depth, needle)
    seg_fn, joiner = _segments_fn(spec, corpus, plan)

    def n_tok(n: int) -> int:
        inp, prefix, _, _ = _assemble(plan, seg_fn(n), joiner, None)
        return len(tokenizer.encode(inp + prefix))

    n = fit_units(n_tok, target_length, guess=guess)
    while True:  # exact placement by token depth; shrink in the rare case it tokenizes longer
        segs = seg_fn(n)
        seg_tokens = _token_lengths(tokenizer, [s + joiner for s in segs])
        inp, prefix, offsets, context = _assemble(plan, segs, joiner, seg_tokens)
        n_tokens = len(tokenizer.encode(inp + prefix))
        if n_tokens <= target_length or n == 0:
            break
        n -= 1
    return Sample(
        task=spec.name,
        index=index,
        target_length=target_length,
        depth=depth,
        input=inp,
        answer_prefix=prefix,
        question=_question_of(spec, inp, needle),
        outputs=plan.outputs,
        needles=[s for s, _ in plan.needles[: plan.n_queried]],
        context=context,
        n_tokens=n_tokens,
        needle_token_pos=len(tokenizer.encode(inp[: offsets[0]])),
        n_units=n,
        context_token_start=len(tokenizer.encode(inp[: inp.find(context)])),
        context_n_tokens=len(tokenizer.encode(context)),
        extra={"needle_char_offsets": offsets, "haystack": spec.haystack},
    )


def _corpus(spec: TaskSpec, corpora: dict[str, Corpus]) -> Corpus | None:
    """The haystack corpus a task reads (None for needle-only tasks); ValueError when it was not loaded."""
    if spec.haystack == "needle":
        return None
    corpus = corpora.get(spec.haystack)
    if corpus is None:
        raise ValueError(f"task {spec.name} needs a {spec.haystack!r} haystack; none was loaded")
    return corpus


def iter_samples(
    specs: Sequence[TaskSpec],
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_samples: int,
    seed: int,
    tokenizer: TokenizerLike,
    corpora: dict[str, Corpus],
    custom: Sequence[CustomNeedle] = (),
) -> Iterator[Sample]:
    """Every (task, length, depth, index) sample in a fixed order; ``corpora`` maps noise/essay to a Corpus."""
    for spec in specs:
        corpus = _corpus(spec, corpora)
        for length in lengths:
            guess = None
            for depth in depths:
                for i in range(n_samples):
                    s = build_sample(
                        spec, tokenizer=tokenizer, target_length=length, depth=depth, index=i, seed=seed,
                        corpus=corpus, custom=custom, guess=guess,
                    )  # fmt: skip
                    guess = s.n_units
                    yield s


def iter_samples_interleaved(
    specs: Sequence[TaskSpec],
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_samples: int,
    seed: int,
    tokenizer: TokenizerLike,
    corpora: dict[str, Corpus],
    custom: Sequence[CustomNeedle] = (),
) -> Iterator[Sample]:
    """The same samples as ``iter_samples`` in coverage order: index, then depth, then length, then task, so
    any prefix of the stream spreads evenly over tasks and lengths (a time-boxed run stays comparable)."""
    corpus = {spec.name: _corpus(spec, corpora) for spec in specs}  # checked before the first sample
    guess: dict[tuple[str, int], int] = {}
    for i in range(n_samples):
        for depth in depths:
            for length in lengths:
                for spec in specs:
                    s = build_sample(
                        spec, tokenizer=tokenizer, target_length=length, depth=depth, index=i, seed=seed,
                        corpus=corpus[spec.name], custom=custom, guess=guess.get((spec.name, length)),
                    )  # fmt: skip
                    guess[(spec.name, length)] = s.n_units
                    yield s
