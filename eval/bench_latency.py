"""GPU latency benchmark: TTT-E2E vs its full-attention (FA) and sliding-window (SWA) twins, one run.

Protocol (``ttt-e2e.md`` §4.3, §7; ``gpu-notes.md``): bf16 weights (fast weights fp32 in the state),
random token ids, warm-up, CUDA events, medians over repeats, inputs rotated over several buffers so that no
measurement runs from the L2 cache. The FA baseline pins the cuDNN SDPA backend when it is available.

Sections (each recorded even when it fails, with the error, e.g. out of memory):
- ``prefill``: seconds per 1K tokens at each length, at a constant number of tokens per batch and at batch 1;
- ``decode``: milliseconds per generated token after a prefill of each context length, with the TTT step
  every b tokens amortised, plus the tail (p99 / max step);
- ``memory``: bytes of TTT state per sequence vs the FA KV cache;
- ``train``: meta-training seconds per 1K tokens vs FA training (forward + backward) at one length;
- ``check``: the GPU path against an fp32 reference on small shapes (relative error).

    python -m eval.bench_latency --preset 125m --lengths 8192 --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from eval.common import run_metadata, write_results
from eval.flops import FORMULAS, prefill_flops_per_token, train_matmul_flops
from ttt import ModelConfig, TTTModel

log = logging.getLogger("bench_latency")


# ---- timing ----------------------------------------------------------------------------------------
def cuda_time(fn: Callable[[int], Any], *, warmup: int, iters: int) -> list[float]:
    """Milliseconds of ``fn(i)`` per call, CUDA events, after ``warmup`` calls; i rotates input buffers."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"median_ms": statistics.median(s), "min_ms": s[0], "max_ms": s[-1], "n": len(s)}


def error_text(e: BaseException) -> str:
    """How a failed section is recorded (the run goes on)."""
    return f"{type(e).__name__}: {str(e)[:300]}"


def safe_call(fn: Callable[..., dict[str, Any]], *a: Any) -> dict[str, Any]:
    """fn(*a), or ``{"error": ...}`` when it raises: a section that fails is recorded and the run goes on."""
    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        return {"error": error_text(e)}


def per_length(fn: Callable[[int], dict[str, Any]], lengths: list[int]) -> list[dict[str, Any]]:
    """``fn(T)`` for every length; a failure is recorded as ``{"T": T, "error": ...}`` and the next one runs."""
    out = []
    for T in lengths:
        try:
            out.append(fn(T))
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            out.append({"T": T, "error": error_text(e)})
        torch.cuda.empty_cache()
    return out


def sdpa_context(fa: bool):
    """Pin cuDNN attention for the full-attention baseline (gpu-notes: ~1.5x the flash backend), and only
    cuDNN, so the record says which kernel ran (an unsupported shape raises and is recorded)."""
    if not fa:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


# ---- models ----------------------------------------------------------------------------------------
def config_of(preset: str, kind: str, vocab: int) -> ModelConfig:
    """The config of a system: kind in {e2e, fa, swa}; FA/SWA twins use the FA MLP width (equal params)."""
    assert kind in ("e2e", "fa", "swa"), f"unknown system {kind!r}: e2e, fa or swa"
    make = {"e2e": ModelConfig.from_name, "fa": ModelConfig.fa_control, "swa": ModelConfig.swa_control}[kind]
    return make(preset, vocab_size=vocab)


def build(preset: str, kind: str, vocab: int, seed: int = 0) -> TTTModel:
    """bf16 model of a preset's system (``config_of``) on the GPU."""
    torch.manual_seed(seed)
    cfg = config_of(preset, kind, vocab)
    with torch.device("cuda"):
        model = TTTModel(cfg)
    return model.to(torch.bfloat16).eval()


def n_params(model: TTTModel, embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    return n if embedding else n - model.tok_emb.weight.numel()


def fa_prefill(model: TTTModel, tokens: torch.Tensor, segment: int | None = None) -> torch.Tensor:
    """Full-attention/SWA prefill: all blocks over the input, logits of the last position only.

    ``segment`` (SWA only): feed the input in pieces with the window caches carried over (bounded memory,
    same result); full attention always runs in one pass.
    """
    cfg = model.cfg
    if segment is None or cfg.window is None or tokens.shape[1] <= segment:
        h, _ = model.run_blocks(model.embed(tokens), range(cfg.n_layers), None, "auto", keep=0)
        return model.head(h[:, -1:])
    kv = None
    for s in range(0, tokens.shape[1], segment):
        h, kv = model.run_blocks(model.embed(tokens[:, s : s + segment]), range(cfg.n_layers), kv, "auto",
                                 keep=cfg.window - 1)  # fmt: skip
    return model.head(h[:, -1:])


def e2e_prefill(model: TTTModel, tokens: torch.Tensor, backend: str, segment: int | None = None) -> Any:
    """TTT-E2E prefill, optionally in segments (``prefill(x[:, :m])`` then ``prefill(x[:, m:], state)``
    equals one call, tested in tests/test_ttt_inner.py): memory stays that of one segment."""
    if segment is None or tokens.shape[1] <= segment:
        return model.prefill(tokens, backend=backend)
    state = None
    for s in range(0, tokens.shape[1], segment):
        out = model.prefill(tokens[:, s : s + segment], state, backend=backend)
        state = out.state
    return out


# ---- sections --------------------------------------------------------------------------------------
def fa_block_mlp_chunked(blk: torch.nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """One full-attention ``Block`` forward (no cache) with its MLP run over ``chunk``-token slices.

    Attention runs in one pass (the fused causal kernel); the MLP is per position, so slicing it changes no
    value (tests/test_bench_latency.py) and bounds its (T, mlp_hidden) intermediates, which at 1M tokens of the
    3b shape do not fit beside attention's q/k/v. FLOPs are those of ``blk(x)``.
    """
    assert not blk.has_prime, "full-attention control blocks have no prime MLP"
    a, _ = blk.attn(blk.attn_norm(x), None, "auto")
    x = x + blk.attn_post(a)  # (B, T, d)
    del a
    out = torch.empty_like(x)
    for s in range(0, x.shape[1], chunk):
        xs = x[:, s : s + chunk]
        out[:, s : s + chunk] = xs + blk.mlp_post(blk.mlp(blk.mlp_norm(xs)))
    return out


def fa_one_layer_ms(model: TTTModel, T: int, args: argparse.Namespace) -> float:
    """Median ms of ONE full-attention block over T tokens (batch 1): long FA prefills are timed per layer
    (attention in one cuDNN pass, the MLP in ``--segment`` slices: same FLOPs, bounded memory)."""
    h = torch.randn(1, T, model.cfg.d_model, device="cuda", dtype=torch.bfloat16)
    chunk = args.segment or T
    with torch.no_grad(), sdpa_context(True):
        ms = cuda_time(
            lambda i: fa_block_mlp_chunked(model.blocks[0], h, chunk),
            warmup=1,
            iters=1 if T > args.long_from else max(1, args.iters // 2),
        )
    return statistics.median(ms)


@contextlib.contextmanager
def only_resident(models: dict[str, TTTModel], keep: str) -> Iterator[None]:
    """Move every model but ``models[keep]`` to the CPU for the block (a 128K full-attention cache needs the
    room), and back afterwards."""
    away = [m for k, m in models.items() if k != keep and next(m.parameters()).is_cuda]
    for m in away:
        m.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        for m in away:
            m.to("cuda")


def _timed_prefill(kind: str, model: TTTModel, bufs: list[torch.Tensor], T: int, B: int,
                   args: argparse.Namespace, keep_state: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """Time one system's prefill; FA past --fa-full-max is one block x n_layers (said in the record)."""
    from ttt.attention import BACKEND_CALLS

    BACKEND_CALLS.clear()
    long = T > args.long_from
    # long inputs: one timed call, after a warm-up on two segments (compiles every shape a long call uses)
    warm, iters = (0, 1) if long else (args.warmup, args.iters)
    if kind == "fa" and T > args.fa_full_max:
        ms = fa_one_layer_ms(model, T, args) * model.cfg.n_layers
        rec: dict[str, Any] = {"median_ms": ms, "scaled_from_one_layer": True, "n": 1}
    else:
        with torch.no_grad(), sdpa_context(kind == "fa"):
            seg = args.segment if long else None
            last: dict[str, Any] = {}  # the timed call's output: its state serves decode at T

            def run(x: torch.Tensor) -> None:
                if kind == "e2e":
                    last["out"] = e2e_prefill(model, x, args.backend, seg)
                else:
                    fa_prefill(model, x, seg)

            if long:
                run(bufs[0][:, : 2 * seg])
            rec = summary(cuda_time(lambda i: run(bufs[i % len(bufs)]), warmup=warm, iters=iters))
            rec["segment"] = seg
            if keep_state is not None and "out" in last:
                keep_state[kind] = last["out"].state
            last.clear()
    rec["backends"] = dict(BACKEND_CALLS)
    rec["s_per_1k"] = rec["median_ms"] / 1000 / (B * T / 1000)
    set_prefill_rate(rec, model.cfg, T, B, args.peak_tflops)
    return rec


def set_prefill_rate(
    rec: dict[str, Any], cfg: ModelConfig, T: int, B: int, peak_tflops: float | None
) -> None:
    """rec's ``tflops`` (``eval.flops`` model FLOPs over its ``median_ms``) and, given the run's matmul peak, ``mfu``."""
    rec["tflops"] = prefill_flops_per_token(cfg, T) * B * T / (rec["median_ms"] / 1000) / 1e12
    if peak_tflops:
        rec["mfu"] = rec["tflops"] / peak_tflops


def bench_prefill(
    models: dict[str, TTTModel], T: int, B: int, args: argparse.Namespace, keep_state: dict | None = None
) -> dict[str, Any]:
    bufs = [torch.randint(0, args.vocab, (B, T), device="cuda") for _ in range(args.rotate)]
    out: dict[str, Any] = {"T": T, "B": B}
    for kind, model in models.items():
        if kind == "fa" and T > args.fa_max:
            out[kind] = {"skipped": f"T={T} > --fa-max {args.fa_max}"}
            continue
        try:
            out[kind] = _timed_prefill(kind, model, bufs, T, B, args, keep_state)
        except torch.OutOfMemoryError as e:
            out[kind] = {"error": f"OOM: {str(e)[:200]}"}
        torch.cuda.empty_cache()
        log.info("prefill T=%d B=%d %s %s", T, B, kind, out[kind])
    if "s_per_1k" in out.get("e2e", {}) and "s_per_1k" in out.get("fa", {}):
        out["fa_over_e2e"] = out["fa"]["s_per_1k"] / out["e2e"]["s_per_1k"]
    return out


def matmul_peak_tflops() -> float:
    """bf16 8192^3 matmul rate on this card (the MFU denominator; gpu-notes: 787 TFLOP/s on the H100)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = statistics.median(cuda_time(lambda i: a @ b, warmup=3, iters=10))
    return 2 * 8192**3 / (ms / 1000) / 1e12


def bench_decode(
    models: dict[str, TTTModel], ctx: int, args: argparse.Namespace, states: dict[str, Any] | None = None
) -> dict[str, Any]:
    """ms per generated token after a prefill of ``ctx`` tokens (batch 1): ``ttt.decode.DecodeSession``.

    TTT-E2E decodes ``b + 64`` tokens so one TTT step (every b tokens) is inside the window and amortised in
    the mean; its tail is the p99 / max step. FA and SWA have no such step: 64 tokens. CUDA events per step.
    ``states`` may hold a prefilled state per system (the long-context prefill's), else one is prefilled here.
    Full attention runs its graphed step with each masked kernel (``DecodeSession(fa_attention=)``: ``auto`` = the
    split-KV Triton kernel TTT-E2E's window uses too, ``sdpa``, ``math``), with only its own model on the GPU (its
    cache is the memory at stake); the fastest one is the baseline.
    """
    out: dict[str, Any] = {"ctx": ctx}
    for kind, model in models.items():
        if kind == "fa" and ctx > args.fa_max:
            out[kind] = {"skipped": f"ctx={ctx} > --fa-max {args.fa_max}: the KV cache does not fit"}
            continue
        if kind != "fa":
            out[kind] = _decode_record(model, kind, ctx, args, (states or {}).get(kind))
            continue
        # full attention: each masked kernel of its graphed step; the baseline is the fastest
        with only_resident(models, kind):
            variants = {a: _decode_record(model, kind, ctx, args, None, a) for a in ("auto", "sdpa", "math")}
        timed = {a: r for a, r in variants.items() if "ms_per_token_mean" in r}
        best = min(timed, key=lambda a: timed[a]["ms_per_token_mean"]) if timed else "sdpa"
        out[kind] = {**variants[best], "fa_attention": best}
        out["fa_variants"] = variants
    if all("ms_per_token_mean" in out.get(k, {}) for k in ("e2e", "fa")):
        out["fa_over_e2e"] = out["fa"]["ms_per_token_mean"] / out["e2e"]["ms_per_token_mean"]
    return out


def _decode_record(
    model: TTTModel, kind: str, ctx: int, args: argparse.Namespace, state: Any, fa_attention: str = "auto"
) -> dict[str, Any]:
    """One system's decode timing (see ``bench_decode``); errors are recorded, the run goes on."""
    from ttt.decode import DecodeSession

    try:
        n = model.cfg.ttt_chunk + 64 if model.cfg.n_ttt_layers else 64
        with torch.no_grad():
            if state is None:
                state = model.prefill(torch.randint(0, args.vocab, (1, ctx), device="cuda")).state
            base = torch.cuda.memory_allocated()
            sess = DecodeSession(
                model, state, max_new_tokens=n, consume_state=True, fa_attention=fa_attention
            )
            cache_bytes = torch.cuda.memory_allocated() - base
            del state
            toks = torch.randint(0, args.vocab, (n, 1), device="cuda")
            ev = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)
            ]
            for i in range(n):
                ev[i][0].record()
                sess.step(toks[i])
                ev[i][1].record()
            torch.cuda.synchronize()
        steps = [a.elapsed_time(b) for a, b in ev][8:]  # the first steps include graph capture
        s = sorted(steps)
        rec = {
            "ms_per_token_mean": statistics.fmean(steps),
            "ms_per_token_median": statistics.median(steps),
            "p99_ms": s[max(0, math.ceil(0.99 * len(s)) - 1)],
            "max_ms": s[-1],
            "n": len(steps),
            "cuda_graph": sess._graph is not None,
            "session_cache_bytes": cache_bytes,
        }
        del sess
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        rec = {"error": error_text(e)}
    torch.cuda.empty_cache()
    return rec


def bench_memory(models: dict[str, TTTModel], T: int) -> dict[str, Any]:
    """TTT state bytes per sequence (fast weights fp32 + SWA caches) vs the FA bf16 KV cache at T tokens."""
    e2e = models["e2e"].cfg
    fa = models.get("fa", models["e2e"]).cfg
    kv_fa = 2 * fa.n_layers * T * fa.n_kv_heads * fa.head_dim * 2
    w = min(e2e.window or T, T)
    kv_swa = 2 * e2e.n_layers * (w - 1) * e2e.n_kv_heads * e2e.head_dim * 2
    fast = 3 * e2e.d_model * e2e.prime_hidden * e2e.n_ttt_layers * 4
    return {"T": T, "fa_kv_bytes": kv_fa, "ttt_state_bytes": kv_swa + fast, "ttt_fast_bytes": fast,
            "ttt_swa_kv_bytes": kv_swa, "fa_over_ttt": kv_fa / (kv_swa + fast)}  # fmt: skip


# meta_loss variants timed beside ``e2e`` in the same run, each with parts of the fast path switched off
# (module, switch, value): ``e2e-math`` the session-11 path (--train-math), ``e2e-eager-ops`` session 13's measured path,
# without ``ttt.ops2`` (--train-eager-ops)
TRAIN_VARIANTS: dict[str, list[tuple[str, str, Any]]] = {
    "e2e-math": [
        ("inner", "META_BACKEND", "math"),
        ("inner", "META_XENT", False),
        ("model", "SECOND_ORDER_OPS", False),
    ],
    "e2e-eager-ops": [("model", "SECOND_ORDER_OPS", False)],
}


@contextlib.contextmanager
def train_variant(kind: str) -> Iterator[None]:
    """Within the block, the switches of ``TRAIN_VARIANTS[kind]`` (none for other kinds); restored afterwards."""
    from ttt import inner
    from ttt import model as tm

    mods = {"inner": inner, "model": tm}
    changes = TRAIN_VARIANTS.get(kind, [])
    saved = [(mods[m], name, getattr(mods[m], name)) for m, name, _ in changes]
    try:
        for m, name, value in changes:
            setattr(mods[m], name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def _train_loss(m: TTTModel, kind: str, x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """One training loss under bf16 autocast: ``e2e`` meta_loss (its TTT blocks' attention as ``META_BACKEND``
    resolves: triton2 on the GPU; its CE ``ttt.xent``; its norms, RoPE and SwiGLU gates ``ttt.ops2``), an ``e2e-*``
    variant (``TRAIN_VARIANTS``), ``fa`` next-token CE."""
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_context(kind == "fa"):
        if kind.startswith("e2e"):
            with train_variant(kind):
                return m.meta_loss(x, checkpoint=args.checkpoint)
        return _fa_train_loss(m, x)


def _train_graph_record(
    m: TTTModel, kind: str, static: torch.Tensor, n_tokens: int, args: argparse.Namespace
) -> dict[str, Any]:
    """The training step replayed from a CUDA graph: grads into static .grad buffers zeroed inside the graph."""
    params = [p for p in m.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)

    def fn() -> torch.Tensor:
        for p in params:
            p.grad.zero_()
        loss = _train_loss(m, kind, static, args)
        loss.backward()
        return loss.detach()

    from ttt.graphs import capture

    eager_loss = float(_train_loss(m, kind, static, args).detach())
    graph, out = capture(fn)
    g = summary(cuda_time(lambda i: graph.replay(), warmup=1, iters=max(2, args.iters // 3)))
    g["s_per_1k"] = g["median_ms"] / n_tokens
    graph.replay()
    g["loss_rel_diff_vs_eager"] = abs(float(out) - eager_loss) / max(abs(eager_loss), 1e-12)
    return g


def _train_record(
    m: TTTModel, kind: str, tok: list[torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """Eager forward + backward timed; with --train-graph also the same step replayed from a CUDA graph (both
    systems alike: grads into static .grad buffers zeroed inside the graph), and the two losses on one input."""

    def step(i: int) -> None:
        _train_loss(m, kind, tok[i % 2], args).backward()
        m.zero_grad(set_to_none=True)

    from ttt.attention import BACKEND_CALLS

    n_tokens = tok[0].shape[0] * (tok[0].shape[1] - 1)  # B * T inputs per step
    BACKEND_CALLS.clear()
    step(0)  # warm-up, and which attention kernels one step runs
    backends = dict(BACKEND_CALLS)
    rec = summary(cuda_time(step, warmup=1, iters=max(2, args.iters // 3)))
    rec["backends"] = backends
    rec["s_per_1k"] = rec["median_ms"] / n_tokens
    if getattr(args, "profile_train", False):
        rec["profile"] = safe_call(profile_train_step, m, kind, tok[0], args)
    if args.train_graph:  # a failure leaves the eager record above standing
        rec["graph"] = safe_call(_train_graph_record, m, kind, tok[0].clone(), n_tokens, args)
        m.zero_grad(set_to_none=True)
    return rec


def train_flops(preset: str, T: int, B: int, vocab: int) -> dict[str, Any]:
    """Matmul FLOPs per token of each system's training step, counted on the meta device (``eval.flops``):
    how much of the e2e / FA time ratio is arithmetic (``e2e_over_fa_linear``), the rest being utilisation."""
    counts = {
        "e2e": train_matmul_flops(config_of(preset, "e2e", vocab), T, lambda m, x: m.meta_loss(x), B),
        "fa": train_matmul_flops(config_of(preset, "fa", vocab), T, _fa_train_loss, B),
    }
    return {**counts, "e2e_over_fa_linear": counts["e2e"]["linear"] / counts["fa"]["linear"]}


def _fa_train_loss(m: TTTModel, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def bench_train(preset: str, T: int, B: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per 1K tokens of one training step (forward + backward): meta_loss vs FA next-token CE."""
    out: dict[str, Any] = {"T": T, "B": B}
    variants = [k for k, on in (("e2e-math", args.train_math), ("e2e-eager-ops", args.train_eager_ops)) if on]
    for kind in ["e2e", "fa", *variants]:
        try:
            model = build(preset, kind.split("-")[0], args.vocab).float().train()
            tok = [torch.randint(0, args.vocab, (B, T + 1), device="cuda") for _ in range(2)]
            out[kind] = _train_record(model, kind, tok, args)
            out[kind]["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            del model
        except Exception as e:  # noqa: BLE001
            out[kind] = {"error": error_text(e)}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out["matmul_flops_per_token"] = safe_call(train_flops, preset, T, B, args.vocab)
    if all("s_per_1k" in out.get(k, {}) for k in ("e2e", "fa")):
        out["e2e_over_fa"] = out["e2e"]["s_per_1k"] / out["fa"]["s_per_1k"]
    if all("s_per_1k" in out.get(k, {}).get("graph", {}) for k in ("e2e", "fa")):
        out["e2e_over_fa_graphed"] = out["e2e"]["graph"]["s_per_1k"] / out["fa"]["graph"]["s_per_1k"]
    for kind, key in (("e2e-math", "math_over_e2e"), ("e2e-eager-ops", "eager_ops_over_e2e")):
        for mode, sub in (("", lambda r: r), ("_graphed", lambda r: r.get("graph", {}))):
            if all("s_per_1k" in sub(out.get(k, {})) for k in ("e2e", kind)):
                out[key + mode] = sub(out[kind])["s_per_1k"] / sub(out["e2e"])["s_per_1k"]
    return out


def bench_chunk_graph(model: TTTModel, T: int, args: argparse.Namespace) -> dict[str, Any]:
    """TTT-E2E prefill of T tokens (batch 1) with the chunk step eager vs replayed from a CUDA graph
    (``ttt.inner.CHUNK_GRAPHS``), same model and inputs; plus the largest NLL difference between the two."""
    from ttt import inner

    bufs = [torch.randint(0, args.vocab, (1, T), device="cuda") for _ in range(args.rotate)]
    out: dict[str, Any] = {"T": T}
    nll = {}
    saved = inner.CHUNK_GRAPHS
    try:
        for name, on in (("eager", False), ("graph", True)):
            inner.CHUNK_GRAPHS = on
            with torch.no_grad():
                nll[name] = model.prefill(bufs[0], backend=args.backend).token_nll.float()  # warm + captures
                ms = cuda_time(lambda i: model.prefill(bufs[i % len(bufs)], backend=args.backend),
                               warmup=1, iters=args.iters)  # fmt: skip
            out[name] = summary(ms)
            out[name]["s_per_1k"] = out[name]["median_ms"] / T
    finally:
        inner.CHUNK_GRAPHS = saved
    out["eager_over_graph"] = out["eager"]["s_per_1k"] / out["graph"]["s_per_1k"]
    out["max_abs_nll_diff"] = float((nll["eager"] - nll["graph"]).abs().max())
    log.info("chunk graph T=%d %s", T, out)
    return out


# kernel name -> category, first match wins (CUDA kernel names of cuBLAS/CUTLASS, flex/flash, ours, Inductor, ATen)
KERNEL_CATEGORIES = (
    ("attention", ("flex", "flash", "fmha", "attention", "cudnn", "_band_", "_hvp_", "_rows")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "addmm", "bmm", "aten::mm")),
    ("fused (compiled)", ("triton",)),
    ("softmax / loss", ("softmax", "cross_entropy", "nll_loss", "log_softmax")),
    ("reduction", ("reduce", "sum", "norm", "mean")),
    ("copy / cast", ("memcpy", "memset", "copy", "cat", "to_copy", "fill")),
    (
        "elementwise (eager)",
        ("elementwise", "vectorized", "unrolled", "mul", "add", "div", "pow", "rsqrt", "silu"),
    ),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def profile_summary(events: list[tuple[str, float, int]], wall_ms: float, top: int = 40) -> dict[str, Any]:
    """(kernel name, total device ms, calls) rows of one profiled call -> shares by category, the top kernels,
    and how much of the wall time the device was busy (low = the host cannot feed it: launches, Python)."""
    busy = sum(ms for _, ms, _ in events)
    cats: dict[str, float] = {}
    for name, ms, _ in events:
        cats[kernel_category(name)] = cats.get(kernel_category(name), 0.0) + ms
    rows = sorted(events, key=lambda e: -e[1])[:top]
    return {
        "wall_ms": wall_ms,
        "device_busy_ms": busy,
        "device_busy_share": busy / wall_ms if wall_ms > 0 else None,
        "kernel_launches": sum(n for _, _, n in events),
        "by_category": {
            c: {"ms": ms, "share": ms / busy} for c, ms in sorted(cats.items(), key=lambda c: -c[1])
        },
        "top_kernels": [{"name": n[:120], "ms": ms, "calls": k, "share": ms / busy} for n, ms, k in rows],
    }


def _device_rows(prof: Any) -> list[tuple[str, float, int]]:
    """Device-side events only: an ATen op row also carries its kernels' time, which would count twice."""
    return [
        (e.key, e.self_device_time_total / 1e3, int(e.count))  # us -> ms
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
    ]


def profile_train_step(m: TTTModel, kind: str, x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """torch.profiler over one warm eager training step (forward + backward): where the device time goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        _train_loss(m, kind, x, args).backward()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    m.zero_grad(set_to_none=True)
    out = profile_summary(_device_rows(prof), wall_ms)
    out["note"] = "wall includes profiler overhead"
    return out


def profile_prefill(model: TTTModel, T: int, args: argparse.Namespace) -> dict[str, Any]:
    """torch.profiler over one warm TTT-E2E prefill of T tokens (batch 1): where the device time goes."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randint(0, args.vocab, (1, T), device="cuda")
    seg = args.segment if T > args.long_from else None
    with torch.no_grad():
        e2e_prefill(model, x, args.backend, seg)  # warm: compiles
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            e2e_prefill(model, x, args.backend, seg)
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) * 1e3
    out = profile_summary(_device_rows(prof), wall_ms)
    out.update({"T": T, "chunks": T // model.cfg.ttt_chunk, "note": "wall includes profiler overhead"})
    return out


def check_vs_fp32(args: argparse.Namespace) -> dict[str, Any]:
    """GPU bf16 prefill NLL vs an fp32 CPU-precision reference of the same small model (relative error)."""
    torch.manual_seed(1)
    cfg = ModelConfig.from_name("debug", vocab_size=512, window=64, ttt_chunk=16)
    ref = TTTModel(cfg).double()
    x = torch.randint(0, 512, (2, 200))
    nll_ref = ref.prefill(x).token_nll
    fast = TTTModel(cfg)
    fast.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    fast = fast.cuda().to(torch.bfloat16)
    nll = fast.prefill(x.cuda(), backend=args.backend).token_nll.double().cpu()
    rel = (nll - nll_ref).norm() / nll_ref.norm()
    return {"what": "prefill token_nll, bf16 GPU vs float64 CPU, debug shape T=200", "rel_err": rel.item(),
            "ok": bool(rel.item() <= 1e-2)}  # fmt: skip


def _summary(res: dict[str, Any], preset: str) -> dict[str, Any]:
    """The comparable headline numbers (issue 4); None where the run did not measure them."""

    def pf(key: str, T: int, kind: str, field: str = "s_per_1k") -> float | None:
        for r in res.get(key, []):
            if r["T"] == T and field in r.get(kind, {}):
                return r[kind][field]
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    def dec(ctx: int, kind: str) -> float | None:
        for r in res.get("decode", []):
            if r["ctx"] == ctx and "ms_per_token_mean" in r.get(kind, {}):
                return r[kind]["ms_per_token_mean"]
        return None

    M = 1 << 20
    e128 = pf("prefill_batch1", 131072, "e2e")
    mem = [m for m in res.get("memory", []) if m["T"] == 131072]
    train = res.get("train", {})
    return {
        "device": res.get("device"),
        "preset": preset,
        f"ttt_prefill_s_per_1k_128k_{preset}": e128,
        f"prefill_speedup_vs_fa_128k_{preset}": ratio(pf("prefill_batch1", 131072, "fa"), e128),
        f"prefill_speedup_vs_fa_1m_{preset}": ratio(
            pf("prefill_batch1", M, "fa"), pf("prefill_batch1", M, "e2e")
        ),
        "prefill_flatness_128k_over_8k": ratio(e128, pf("prefill_batch1", 8192, "e2e")),
        "prefill_flatness_1m_over_128k": ratio(pf("prefill_batch1", M, "e2e"), e128),
        "prefill_mfu": pf("prefill_batch1", 131072, "e2e", "mfu"),
        "decode_speedup_vs_fa_128k": ratio(dec(131072, "fa"), dec(131072, "e2e")),
        "decode_flatness_1m_over_8k": ratio(dec(M, "e2e"), dec(8192, "e2e")),
        "state_memory_ratio_128k": mem[0]["fa_over_ttt"] if mem else None,
        "meta_train_slowdown_vs_fa_8k": train.get("e2e_over_fa"),
        "meta_train_slowdown_vs_fa_8k_graphed": train.get("e2e_over_fa_graphed"),
        "formulas": {
            **FORMULAS,
            "mfu": "prefill TFLOP/s (formula above) / bf16 8192^3 matmul TFLOP/s measured in the same run",
            "fa_kv_bytes": "2 * L * T * Hkv * Dh * 2 (bf16 K and V)",
            "ttt_state_bytes": "2 * L * (window-1) * Hkv * Dh * 2 + 3 * d * f_prime * n_ttt * 4 (fp32 fast weights)",
        },
    }


# the paper's Fig. 1 right (3b, H100, JAX; fig-extracted, ``ttt-e2e.md`` §4.3): prefill seconds per 1K tokens
PAPER_PREFILL = {
    "TTT-E2E (paper, 128K tokens per batch)": {
        8192: 0.0252,
        16384: 0.0251,
        32768: 0.0258,
        65536: 0.0264,
        131072: 0.0274,
    },
    "FA (paper, 128K tokens per batch)": {
        8192: 0.0137,
        16384: 0.0169,
        32768: 0.0239,
        65536: 0.0388,
        131072: 0.0734,
    },
}
_LABELS = {"e2e": "TTT-E2E (ours)", "fa": "FA, cuDNN (ours)", "swa": "SWA (ours)"}


def prefill_series(res: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Batch-1 prefill seconds per 1K tokens by system and length, as measured in ``res`` (errors left out)."""
    out: dict[str, dict[int, float]] = {}
    for rec in res.get("prefill_batch1", []):
        for kind, label in _LABELS.items():
            if "s_per_1k" in rec.get(kind, {}):
                out.setdefault(label, {})[rec["T"]] = rec[kind]["s_per_1k"]
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def plot_latency(res: dict[str, Any], path: Path, preset: str) -> dict[str, dict[int, float]]:
    """Log-log plot of prefill s/1K tokens vs context (ours; the paper's curves for the 3b shape as dashed
    references) written to ``path`` (PNG); returns the series drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the eval extra
        raise ImportError("the latency plot needs matplotlib: pip install 'ttt-rag[eval]'") from e
    series = prefill_series(res)
    assert series, "no prefill timings to plot"
    drawn = {**series, **(PAPER_PREFILL if preset == "3b" else {})}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in drawn.items():
        ax.plot(list(pts), list(pts.values()), "--" if "paper" in label else "-o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="prefill seconds per 1K tokens",
           title=f"{preset} prefill, batch 1, {res.get('device', {}).get('gpu', '?')}")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def rederive_flops(res: dict[str, Any]) -> None:
    """Recompute every prefill record's TFLOP/s and MFU from its measured median with ``eval.flops`` (in place):
    runs timed before that accounting (whose formula counted gradients the inner step never takes) then state the
    same figures as new runs. The timings themselves are untouched."""
    cfg = res.get("config") or {}
    assert "preset" in cfg and "vocab" in cfg, (
        "rederive_flops needs one run's record (its config), not a merged one"
    )
    peak = res.get("matmul_peak_tflops")
    for key in ("prefill_batch1", "prefill_const_tokens"):
        for rec in res.get(key) or []:
            for kind in ("e2e", "fa", "swa"):
                r = rec.get(kind)
                if not isinstance(r, dict) or "median_ms" not in r:
                    continue
                set_prefill_rate(
                    r, config_of(cfg["preset"], kind, cfg["vocab"]), rec["T"], rec.get("B", 1), peak
                )
    res["flops_formula"] = FORMULAS["prefill_flops_per_token"]


def merge_runs(paths: list[str]) -> dict[str, Any]:
    """Several runs of one session (same device, same code) as one record: each (length, system) prefill from the
    last file that timed it (list the run whose FA and TTT-E2E timings should pair last), memory / decode / train /
    profile sections from the last file that has them, TFLOP/s and MFU re-derived (``rederive_flops``), and the
    summary recomputed over the whole; ``merged_from`` lists the files with their timestamps, git shas and configs."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    gpus = {r["device"]["gpu"] for r in runs}
    assert len(gpus) == 1, f"runs from different GPUs do not merge: {sorted(gpus)}"
    for r in runs:
        rederive_flops(r)
    res: dict[str, Any] = {"device": runs[-1]["device"], "merged_from": [], "prefill_batch1": []}
    by_len: dict[int, dict[str, Any]] = {}
    for path, r in zip(paths, runs, strict=True):
        res["merged_from"].append({"file": Path(path).name, "timestamp": r.get("timestamp"),
                                   "git_sha": r.get("git_sha"), "config": r.get("config")})  # fmt: skip
        for rec in r.get("prefill_batch1", []):  # per length and system: a later file's timing wins
            by_len.setdefault(rec["T"], {}).update(rec)
        for key in ("memory", "decode", "train", "profile", "check", "attention_auto", "matmul_peak_tflops"):
            if r.get(key) is not None:
                res[key] = r[key]
    res["prefill_batch1"] = [by_len[T] for T in sorted(by_len)]
    preset = {r["config"]["preset"] for r in runs}
    assert len(preset) == 1, f"runs of different presets do not merge: {sorted(preset)}"
    res["summary"] = _summary(res, preset.pop())
    return res


def apply_path_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Set the module switches of the TTT-E2E path from the command line (``--chunk-graph``: every prefill replays its
    chunk-step graph, ``--compare-graph`` still times both; backends; the fused ops), and say what they are."""
    from ttt import attention as att
    from ttt import inner
    from ttt import model as tm

    inner.CHUNK_GRAPHS = args.chunk_graph
    inner.HEAD_FUSED = not args.eager_head
    att.CHUNK_BACKEND = args.chunk_backend or att.CHUNK_BACKEND
    att.LONG_BACKEND = args.long_backend or att.LONG_BACKEND
    tm.FUSED_NORM_ROPE = False if args.unfused_norm_rope else tm.FUSED_NORM_ROPE
    tm.FUSED_BLOCK_OPS = tm.FUSED_BLOCK_OPS and not args.unfused_block_ops
    return {
        "chunk": att.CHUNK_BACKEND,
        "long": att.LONG_BACKEND,
        "head_fused": inner.HEAD_FUSED,
        "fused_norm_rope": tm.FUSED_NORM_ROPE is not False,
        "fused_block_ops": tm.FUSED_BLOCK_OPS,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="125m")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument(
        "--tokens-per-batch", type=int, default=0, help="constant tokens per batch (0 = batch 1 only)"
    )
    p.add_argument(
        "--long-lengths", type=int, nargs="*", default=[], help="batch-1 lengths for e2e/swa (512K, 1M)"
    )
    p.add_argument("--long-from", type=int, default=262144, help="above: 1 warm-up + 1 timed call, segments")
    p.add_argument("--segment", type=int, default=131072, help="segment length of long e2e/swa prefills")
    p.add_argument("--systems", nargs="+", default=["e2e", "fa", "swa"])
    p.add_argument("--fa-max", type=int, default=1 << 20, help="longest length to time full attention at")
    p.add_argument("--fa-full-max", type=int, default=131072, help="above: FA = one block x n_layers")
    p.add_argument("--backend", default="auto", help="attention backend of the TTT path")
    p.add_argument(
        "--chunk-backend", default=None, help="auto's choice below FLEX_MIN_QUERIES: triton | fa2 | flex"
    )
    p.add_argument(
        "--long-backend", default=None, help="auto's choice for long inputs: triton | flex | fa2 | band"
    )
    p.add_argument("--eager-head", action="store_true", help="chunk steps use the eager head (no fused NLL)")
    p.add_argument(
        "--unfused-norm-rope", action="store_true", help="prefix q/k norm and RoPE as separate compiled ops"
    )
    p.add_argument(
        "--unfused-block-ops", action="store_true", help="separate silu/mul and norm/residual-add kernels"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rotate", type=int, default=3)
    p.add_argument("--decode", type=int, nargs="*", default=[], help="context lengths for decode timing")
    p.add_argument("--profile", type=int, nargs="*", default=[], help="TTT-E2E prefill lengths to profile")
    p.add_argument(
        "--train-graph", action="store_true", help="also time each training step from a CUDA graph"
    )
    p.add_argument(
        "--chunk-graph", action="store_true", help="every TTT-E2E prefill replays its chunk step graph"
    )
    p.add_argument(
        "--compare-graph", type=int, nargs="*", default=[], help="lengths: chunk step eager vs graph"
    )
    p.add_argument(
        "--train", type=int, default=0, help="sequence length of the training comparison (0 = skip)"
    )
    p.add_argument(
        "--train-preset", default=None, help="preset of the training comparison (default --preset)"
    )
    p.add_argument("--train-batch", type=int, default=1)
    p.add_argument(
        "--profile-train", action="store_true", help="profile one eager step of each training system"
    )
    p.add_argument(
        "--train-math",
        action="store_true",
        help="also time the session-11 meta_loss path (explicit attention, generic CE, eager norms) as e2e-math",
    )
    p.add_argument(
        "--train-eager-ops",
        action="store_true",
        help="also time meta_loss without ttt.ops2 (eager second-order norms, RoPE, SwiGLU) as e2e-eager-ops",
    )
    p.add_argument(
        "--checkpoint", action="store_true", help="meta_loss with per-chunk activation checkpointing"
    )
    p.add_argument("--smoke", action="store_true", help="name the results file latency-<preset>-smoke")
    p.add_argument(
        "--merge", nargs="+", default=None, help="result JSONs of one session to merge (no GPU run)"
    )
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.merge:  # no GPU needed: combine result files of one session
        res = merge_runs(args.merge)
        out = write_results(args.name or "latency-merged", res, args.out)
        plot_latency(res, out.with_suffix(".png"), res["summary"]["preset"])
        log.info("summary %s", res["summary"])
        return res
    assert torch.cuda.is_available(), "bench_latency needs a CUDA GPU"
    # long FA prefills/decodes allocate caches of tens of GB between smaller tensors: without expandable
    # segments the allocator fragments (measured: 23 GB reserved but unallocated at a 128K FA decode OOM)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = args.name or f"latency-{args.preset}-{'smoke' if args.smoke else 'full'}"
    res: dict[str, Any] = run_metadata(vars(args), seed=0)

    def save() -> None:  # after every section: a run cut short still leaves its numbers (and its plot)
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["summary"] = _summary(res, args.preset)
        out = write_results(name, res, args.out)
        if prefill_series(res):
            plot_latency(res, out.with_suffix(".png"), args.preset)

    args.peak_tflops = res["matmul_peak_tflops"] = matmul_peak_tflops()
    res["check"] = check_vs_fp32(args)
    log.info("peak %.0f TFLOP/s; check %s", args.peak_tflops, res["check"])
    models = {k: build(args.preset, k, args.vocab) for k in args.systems}
    res["attention_auto"] = apply_path_flags(args)
    res["params"] = {k: n_params(m, embedding=True) for k, m in models.items()}
    res["memory"] = [bench_memory(models, T) for T in sorted({*args.lengths, *args.long_lengths})]
    res["prefill_batch1"] = [bench_prefill(models, T, 1, args) for T in args.lengths]
    save()
    if args.tokens_per_batch:
        res["prefill_const_tokens"] = [  # batch 1 at T = tokens per batch: the batch-1 record itself
            bench_prefill(models, T, args.tokens_per_batch // T, args)
            if args.tokens_per_batch // T > 1
            else next(r for r in res["prefill_batch1"] if r["T"] == T)
            for T in args.lengths
            if args.tokens_per_batch // T >= 1
        ]
        save()
    if args.compare_graph and "e2e" in models:
        res["chunk_graph"] = per_length(
            partial(bench_chunk_graph, models["e2e"], args=args), args.compare_graph
        )
        save()
    if args.profile and "e2e" in models:
        res["profile"] = per_length(partial(profile_prefill, models["e2e"], args=args), args.profile)
        save()
    if args.decode:
        res["decode"] = [bench_decode(models, c, args) for c in args.decode]
        save()
    for T in args.long_lengths:  # the long prefill's final state is reused for decode at that context
        states: dict[str, Any] = {}
        res["prefill_batch1"].append(bench_prefill(models, T, 1, args, keep_state=states))
        save()  # a long decode that does not finish must not take the long prefill's numbers with it
        if args.decode:
            res["decode"].append(
                bench_decode({k: m for k, m in models.items() if k in states}, T, args, states)
            )
        del states
        save()
    del models
    torch.cuda.empty_cache()
    if args.train:
        res["train"] = bench_train(args.train_preset or args.preset, args.train, args.train_batch, args)
        save()
    save()
    log.info("summary %s", res["summary"])
    return res


if __name__ == "__main__":
    main()
