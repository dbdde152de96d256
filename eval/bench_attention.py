"""Sliding-window attention kernels on the GPU: the shapes TTT-E2E prefill runs, every exact backend side by side.

Two shapes per preset (window k = 8192 by default):
- ``chunk``: one suffix chunk, b = 1024 queries over the k - 1 cached keys plus the chunk's own (forward, and
  forward + backward: prefill differentiates the chunk loss to the fast weights through this attention);
- ``prefix``: the prefix layers' one pass over T tokens (forward only); ``band`` = two cuDNN causal passes merged
  by log-sum-exp (``ttt.attention._band_attention``), checked forward-only against fp32 math.

Backends: ``flex`` (FlexAttention, compiled block mask; ``flex:<opts>`` adds kernel_options), ``fa2`` (torch's
built-in FlashAttention-2 with ``window_size``), and, for the chunk, SDPA with a ``causal_lower_right`` mask
over the same keys on the cuDNN and flash backends: NOT the band (early queries see up to b - 1 keys too many),
recorded only as the fused-kernel rate to compare against. Every exact backend is checked against fp32 math
attention on the chunk shape (outputs and gradients) in the same run.

- ``second`` (``--parts second``): the chunk shape differentiated twice, as ``meta_loss`` does (forward, first
  gradients with create_graph, then the gradients of <(dq, dk, dv), cotangents> w.r.t. q, k, v and dO): explicit
  ``math`` attention against ``triton2`` (``ttt/triton_band2.py``), each checked against fp32 math.

TFLOP/s count the band's visible (query, key) pairs: 4 * D * H * pairs forward, 2.5x that forward + backward.

    python -m eval.bench_attention --presets 3b 1b --out eval/results
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from eval.bench_latency import cuda_time, safe_call, summary
from eval.common import run_metadata, write_results
from ttt import attention as att
from ttt.attention import (
    _band_attention,
    _fa2_attention,
    _flex_attention,
    _math_attention,
    _triton_attention,
    attention_in_window,
    band_mask,
)

log = logging.getLogger("bench_attention")

SHAPES = {"3b": (32, 80), "1b": (32, 64), "125m": (12, 64)}  # preset -> (heads, head dim)


def visible_pairs(tq: int, tk: int, window: int) -> int:
    """(query, key) pairs inside the band, lower-right aligned (exact count, no mask materialised)."""
    pos = torch.arange(tk - tq, tk, dtype=torch.int64)  # query positions
    return int((torch.clamp(pos + 1, max=window)).sum())


def _flex_with(opts: dict[str, int] | None) -> Callable[..., torch.Tensor]:
    if not opts:
        return lambda q, k, v, w: _flex_attention(q, k, v, w, 0)
    from torch.nn.attention.flex_attention import flex_attention

    from ttt.attention import _block_mask

    fn = torch.compile(flex_attention, dynamic=False)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int) -> torch.Tensor:
        bm = _block_mask(q.shape[2], k.shape[2], w, 0, q.device)
        return fn(q, k, v, block_mask=bm, kernel_options=opts)

    return run


def _lower_right(backend: torch.nn.attention.SDPBackend) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2])
            )

    return run


FLEX_OPTS = {
    "flex": None,
    "flex:m64n64": {"BLOCK_M": 64, "BLOCK_N": 64},
}


def kernels() -> dict[str, Callable[..., torch.Tensor]]:
    from torch.nn.attention import SDPBackend

    out: dict[str, Callable[..., torch.Tensor]] = {"fa2": _fa2_attention, "triton": _triton_attention}
    out.update({name: _flex_with(o) for name, o in FLEX_OPTS.items()})
    out["sdpa-cudnn-lower-right (not the band)"] = _lower_right(SDPBackend.CUDNN_ATTENTION)
    out["sdpa-flash-lower-right (not the band)"] = _lower_right(SDPBackend.FLASH_ATTENTION)
    return out


def _random_qkv(g: torch.Generator, H: int, D: int, tq: int, tk: int) -> tuple[torch.Tensor, ...]:
    """bf16 q (1, H, tq, D), k and v (1, H, tk, D) drawn from ``g`` in that order."""
    return tuple(
        torch.randn(1, H, t, D, device="cuda", generator=g, dtype=torch.bfloat16) for t in (tq, tk, tk)
    )


def check_exact(
    fn: Callable[..., torch.Tensor], H: int, D: int, tq: int, tk: int, w: int
) -> dict[str, float]:
    """Relative error of outputs and q/k/v gradients (bf16 kernel vs fp32 math on the same bf16 inputs)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = _random_qkv(g, H, D, tq, tk)
    do = torch.randn(1, H, tq, D, device="cuda", generator=g, dtype=torch.bfloat16)
    res = {}
    for name, f, dt in (("ref", _math_attention, torch.float32), ("fast", fn, torch.bfloat16)):
        xs = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
        o = f(*xs, w)
        o.float().mul(do.float()).sum().backward()
        res[name] = [o.detach().float()] + [x.grad.float() for x in xs]  # type: ignore[union-attr]
    errs = [float((a - b).norm() / b.norm()) for a, b in zip(res["fast"], res["ref"], strict=True)]
    return dict(zip(("out", "dq", "dk", "dv"), errs, strict=True))


def check_forward(
    fn: Callable[..., torch.Tensor], H: int, D: int, tq: int, tk: int, w: int
) -> dict[str, float]:
    """Relative error of a forward-only kernel's output (bf16) vs fp32 math on the same bf16 inputs."""
    q, k, v = _random_qkv(torch.Generator(device="cuda").manual_seed(1), H, D, tq, tk)
    with torch.no_grad():
        ref = _math_attention(q.float(), k.float(), v.float(), w)
        err = (fn(q, k, v, w).float() - ref).norm() / ref.norm()
    return {"out": float(err)}


def time_kernel(
    fn: Callable[..., torch.Tensor], H: int, D: int, tq: int, tk: int, w: int, backward: bool, args: Any
) -> dict[str, Any]:
    bufs = [
        [
            torch.randn(1, H, t, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
            for t in (tq, tk, tk)
        ]
        for _ in range(args.rotate)
    ]  # inputs rotated beyond the L2 cache
    do = torch.randn(1, H, tq, D, device="cuda", dtype=torch.bfloat16)

    def call(i: int) -> None:
        q, k, v = bufs[i % len(bufs)]
        if backward:
            torch.autograd.grad(fn(q, k, v, w), (q, k, v), do)
        else:
            with torch.no_grad():
                fn(q, k, v, w)

    rec = summary(cuda_time(call, warmup=args.warmup, iters=args.iters))
    flops = 4 * D * H * visible_pairs(tq, tk, w) * (2.5 if backward else 1.0)
    rec["tflops_band"] = flops / (rec["median_ms"] * 1e-3) / 1e12
    return rec


# a TTT chunk step's attention as the model calls it (``attention_in_window``: new keys written into the window,
# gradients for q and the b new keys only): backend, forward kernel of the triton path
WINDOW_PATHS = {
    "fa2": ("fa2", "triton"),
    "triton": ("triton", "triton"),
    "fa2-fwd+triton-bwd": ("triton", "fa2"),
}


def _window_call(H: int, D: int, b: int, w: int, path: str, q, k, v, kw, vw, do) -> tuple:  # noqa: ANN001
    backend, fwd = WINDOW_PATHS[path]
    saved, att.TRITON_WINDOW_FWD = att.TRITON_WINDOW_FWD, fwd
    try:
        o = attention_in_window(q, k, v, kw, vw, window=w, backend=backend)
        return (o, *torch.autograd.grad(o, (q, k, v), do))
    finally:
        att.TRITON_WINDOW_FWD = saved


def _window_inputs(g: torch.Generator, H: int, D: int, b: int, w: int, dt: torch.dtype) -> tuple:
    q, k, v, do = (
        torch.randn(1, H, b, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4)
    )
    kw, vw = (
        torch.randn(1, H, w - 1 + b, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2)
    )
    q, k, v = (t.to(dt).requires_grad_(True) for t in (q, k, v))
    return q, k, v, kw.to(dt), vw.to(dt), do.to(dt)


def time_window(H: int, D: int, b: int, w: int, path: str, args: Any) -> dict[str, Any]:
    """Forward + backward of one chunk step's attention (``attention_in_window``), inputs rotated."""
    bufs = [_window_inputs(torch.Generator(device="cuda").manual_seed(i), H, D, b, w, torch.bfloat16)
            for i in range(args.rotate)]  # fmt: skip
    rec = summary(
        cuda_time(
            lambda i: _window_call(H, D, b, w, path, *bufs[i % len(bufs)]),
            warmup=args.warmup,
            iters=args.iters,
        )
    )
    rec["tflops_band"] = 4 * D * H * visible_pairs(b, w - 1 + b, w) * 2.5 / (rec["median_ms"] * 1e-3) / 1e12
    return rec


def check_window(H: int, D: int, b: int, w: int, path: str) -> dict[str, float]:
    """Relative error of out, dq, dk, dv (new keys) of a window path (bf16) vs fp32 math on the same inputs."""
    xs = _window_inputs(torch.Generator(device="cuda").manual_seed(7), H, D, b, w, torch.bfloat16)
    fast = _window_call(H, D, b, w, path, *xs)
    q, k, v, kw, vw, do = (t.detach().float().requires_grad_(t.requires_grad) for t in xs)
    kf, vf = torch.cat((kw[:, :, : w - 1], k), 2), torch.cat((vw[:, :, : w - 1], v), 2)
    o = _math_attention(q, kf, vf, w)
    ref = (o, *torch.autograd.grad(o, (q, k, v), do))
    errs = [float((a.float() - r).norm() / r.norm()) for a, r in zip(fast, ref, strict=True)]
    return dict(zip(("out", "dq", "dk", "dv"), errs, strict=True))


def _second_order_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int) -> torch.Tensor:
    return att.attention(q, k, v, window=w, backend="math")


def _second_order_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int) -> torch.Tensor:
    return att.attention(q, k, v, window=w, backend="triton2")


SECOND_ORDER = {"math": _second_order_math, "triton2": _second_order_triton}


def _second_inputs(g: torch.Generator, H: int, D: int, tq: int, tk: int, dt: torch.dtype) -> tuple:
    """q, k, v, dO (requiring grad) and the cotangents of dq, dk, dv, in dtype dt."""
    q, k, v = _random_qkv(g, H, D, tq, tk)
    do = torch.randn(1, H, tq, D, device="cuda", generator=g, dtype=torch.bfloat16)
    cot = tuple(torch.randn(t.shape, device="cuda", generator=g, dtype=torch.bfloat16) for t in (q, k, v))
    return (*(t.to(dt).requires_grad_(True) for t in (q, k, v, do)), *(c.to(dt) for c in cot))


def _second_call(fn: Callable[..., torch.Tensor], w: int, q, k, v, do, *cot) -> tuple:  # noqa: ANN001
    o = fn(q, k, v, w)
    first = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    inner = sum((a.float() * c.float()).sum() for a, c in zip(first, cot, strict=True))
    return (o, *first, *torch.autograd.grad(inner, (q, k, v, do)))


def time_second(fn: Callable[..., torch.Tensor], H: int, D: int, tq: int, tk: int, w: int, args: Any) -> dict:
    """Forward + first gradients (create_graph) + their gradients, inputs rotated."""
    bufs = [_second_inputs(torch.Generator(device="cuda").manual_seed(i), H, D, tq, tk, torch.bfloat16)
            for i in range(args.rotate)]  # fmt: skip
    rec = summary(cuda_time(lambda i: _second_call(fn, w, *bufs[i % len(bufs)]), warmup=args.warmup,
                            iters=args.iters))  # fmt: skip
    rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return rec


def check_second(
    fn: Callable[..., torch.Tensor], H: int, D: int, tq: int, tk: int, w: int
) -> dict[str, float]:
    """Relative errors (bf16 kernel vs fp32 math, same inputs) of out, the first and the second gradients."""
    xs = _second_inputs(torch.Generator(device="cuda").manual_seed(7), H, D, tq, tk, torch.bfloat16)
    fast = _second_call(fn, w, *xs)
    ref = _second_call(_math_attention, w, *(t.detach().float().requires_grad_(t.requires_grad) for t in xs))
    names = ("out", "dq", "dk", "dv", "q2", "k2", "v2", "do2")
    return {n: float((a.float() - r).norm() / r.norm()) for n, a, r in zip(names, fast, ref, strict=True)}


def bench_second(H: int, D: int, b: int, w: int, args: Any) -> dict[str, Any]:
    """meta_loss's attention differentiated twice on the chunk shape: math vs triton2, each timed and checked."""
    out: dict[str, Any] = {"tq": b, "tk": w - 1 + b, "window": w, "time": {}, "checks": {}}
    for name, fn in SECOND_ORDER.items():
        torch.cuda.reset_peak_memory_stats()
        out["time"][name] = safe_call(time_second, fn, H, D, b, w - 1 + b, w, args)
        out["checks"][name] = safe_call(check_second, fn, H, D, b, w - 1 + b, w)
        log.info("second order %s %s %s", name, out["time"][name], out["checks"][name])
        torch.cuda.empty_cache()
    t = out["time"]
    if all("median_ms" in t[n] for n in SECOND_ORDER):
        out["math_over_triton2"] = t["math"]["median_ms"] / t["triton2"]["median_ms"]
    if args.triton_sweep:
        out["sweep"] = hvp_sweep(H, D, b, w, args)
    return out


# launch configs of the three second-order kernels tried by --triton-sweep with --parts second
HVP_SWEEP = [(64, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (64, 64, 4, 2)]


def hvp_sweep(H: int, D: int, b: int, w: int, args: Any) -> dict[str, Any]:
    """triton2 differentiated twice on the chunk shape under each config of ``HVP_SWEEP``."""
    from ttt import triton_band2 as t2

    saved = dict(t2.HVP_CONFIGS)
    out: dict[str, Any] = {"head_dim": D}
    try:
        for cfg in HVP_SWEEP:
            t2.HVP_CONFIGS.clear()
            t2.HVP_CONFIGS[D] = cfg
            out[str(cfg)] = safe_call(time_second, _second_order_triton, H, D, b, w - 1 + b, w, args)
            log.info("sweep second order %s %s", cfg, out[str(cfg)])
    finally:
        t2.HVP_CONFIGS.clear()
        t2.HVP_CONFIGS.update(saved)
    return out


# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by --triton-sweep: forward on the prefix shape, dQ in the window step
FWD_SWEEP = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
CHUNK_FWD_SWEEP = [
    (128, 64, 4, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 4),
    (128, 128, 8, 3),
    (64, 32, 4, 4),
]
DQ_SWEEP = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4)]


def triton_sweep(H: int, D: int, b: int, w: int, args: Any) -> dict[str, Any]:
    """Each launch config of our forward (prefix; chunk) and dQ (window step) kernels, timed as the defaults are:
    one ``ttt.triton_band`` config at a time, the others at their defaults."""
    from ttt import triton_band as tb

    sweeps = {  # record key -> (the config it sweeps, the configs, one timing)
        "prefix_fwd": ("FWD_CONFIG", FWD_SWEEP,
                       lambda: time_kernel(_triton_attention, H, D, args.prefix, args.prefix, w, False, args)),
        "chunk_fwd": ("CHUNK_FWD_CONFIG", CHUNK_FWD_SWEEP,
                      lambda: time_kernel(_triton_attention, H, D, b, w - 1 + b, w, False, args)),
        "window_step": ("DQ_CONFIG", DQ_SWEEP, lambda: time_window(H, D, b, w, "triton", args)),
    }  # fmt: skip
    out: dict[str, Any] = {}
    for key, (name, configs, timing) in sweeps.items():
        saved, out[key] = getattr(tb, name), {}
        try:
            for cfg in configs:
                setattr(tb, name, cfg)
                out[key][str(cfg)] = safe_call(timing)
                log.info("sweep %s %s %s", key, cfg, out[key][str(cfg)])
        finally:
            setattr(tb, name, saved)
    return out


def bench_preset(preset: str, args: Any) -> dict[str, Any]:
    H, D = SHAPES[preset]
    w, b = args.window, args.chunk
    out: dict[str, Any] = {"heads": H, "head_dim": D, "window": w, "chunk": b, "checks": {}, "chunk_fwd": {},
                           "chunk_fwd_bwd": {}, "prefix_fwd": {}}  # fmt: skip
    tk = w - 1 + b
    for name, fn in kernels().items() if "chunk" in args.parts else ():
        exact = "not the band" not in name
        for key, bwd in (("chunk_fwd", False), ("chunk_fwd_bwd", True)):  # a kernel that fails is recorded
            out[key][name] = safe_call(time_kernel, fn, H, D, b, tk, w, bwd, args)
            log.info("%s %s %s %s", preset, key, name, out[key][name])
        if exact:
            out["checks"][name] = safe_call(check_exact, fn, H, D, b, tk, w)
            log.info("%s check %s %s", preset, name, out["checks"][name])
        torch.cuda.empty_cache()
    if "chunk" in args.parts:
        out["window_step"] = {name: safe_call(time_window, H, D, b, w, name, args) for name in WINDOW_PATHS}
        out["checks"].update(
            {f"window {name}": safe_call(check_window, H, D, b, w, name) for name in WINDOW_PATHS}
        )
        log.info("%s window step %s", preset, out["window_step"])
    if "second" in args.parts:
        out["second_order"] = bench_second(H, D, b, w, args)
    if args.triton_sweep and {"chunk", "prefix"} & set(args.parts):
        out["triton_sweep"] = triton_sweep(H, D, b, w, args)
    if "prefix" not in args.parts:
        return out
    prefix_kernels = {"fa2": _fa2_attention, "flex": _flex_with(None), "band": _band_attention,
                      "triton": _triton_attention}  # fmt: skip
    for tq, tk in ((4096, 4096), (3000, 3000 + 1023)):  # band is forward only: its own check, window 1024
        for name in ("band", "triton"):
            out["checks"][f"{name} prefix {tq}x{tk}"] = safe_call(check_forward, prefix_kernels[name], H, D, tq, tk,
                                                                  1024)  # fmt: skip
    log.info("%s band checks %s", preset, {k: v for k, v in out["checks"].items() if k.startswith("band")})
    for name, fn in prefix_kernels.items():
        out["prefix_fwd"][name] = safe_call(time_kernel, fn, H, D, args.prefix, args.prefix, w, False, args)
        log.info("%s prefix %s %s", preset, name, out["prefix_fwd"][name])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["3b"], choices=sorted(SHAPES))
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--prefix", type=int, default=131072, help="tokens of the prefix-pass shape")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rotate", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=["chunk", "prefix"], choices=["chunk", "prefix", "second"])
    p.add_argument(
        "--triton-sweep", action="store_true", help="time each launch config of our Triton kernels"
    )
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="attention-kernels")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    assert torch.cuda.is_available(), "bench_attention needs a CUDA GPU"
    for tq, tk, w in ((2, 3, 2), (5, 9, 3), (4, 4, 8)):  # the FLOP count's pair formula == the mask's count
        assert visible_pairs(tq, tk, w) == int(band_mask(tq, tk, w).sum()), (tq, tk, w)
    res = run_metadata(vars(args), seed=0)
    res["presets"] = {}
    for preset in args.presets:
        res["presets"][preset] = bench_preset(preset, args)
        write_results(args.name, res, args.out)
    return res


if __name__ == "__main__":
    main()
