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
import logging
import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from eval.common import run_metadata, write_results
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


def sdpa_context(fa: bool):
    """Pin cuDNN attention for the full-attention baseline when the build has it (gpu-notes: ~1.5x flash)."""
    if not fa:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    )


# ---- models ----------------------------------------------------------------------------------------
def build(preset: str, kind: str, vocab: int, seed: int = 0) -> TTTModel:
    """bf16 model of a preset: kind in {e2e, fa, swa}; FA/SWA twins use the FA MLP width (equal params)."""
    torch.manual_seed(seed)
    if kind == "e2e":
        cfg = ModelConfig.from_name(preset, vocab_size=vocab)
    elif kind == "fa":
        cfg = ModelConfig.fa_control(preset, vocab_size=vocab)
    else:
        cfg = ModelConfig.swa_control(preset, vocab_size=vocab)
    with torch.device("cuda"):
        model = TTTModel(cfg)
    return model.to(torch.bfloat16).eval()


def n_params(model: TTTModel, embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    return n if embedding else n - model.tok_emb.weight.numel()


def fa_prefill(model: TTTModel, tokens: torch.Tensor) -> torch.Tensor:
    """Full-attention/SWA prefill: all blocks over the input, logits of the last position only."""
    h, _ = model.run_blocks(model.embed(tokens), range(model.cfg.n_layers), None, "sdpa")
    return model.head(h[:, -1:])


def prefill_flops_per_token(model: TTTModel, T: int) -> float:
    """Model FLOPs/token of a TTT-E2E (or plain) prefill: 2*P forward + causal attention + inner backward.

    Inner step: the TTT blocks + head run forward (counted in 2*P) and backward for activation grads and the
    prime weight grads (~2x their forward, the head included). Attention: 2 * 2 * window_keys * d per layer.
    """
    cfg = model.cfg
    fwd = 2 * n_params(model)
    keys = T / 2 if cfg.window is None or cfg.window >= T else cfg.window
    attn = 4 * keys * cfg.n_heads * cfg.head_dim * cfg.n_layers
    flops = fwd + attn + 2 * cfg.vocab_size * cfg.d_model  # the head of every position
    if cfg.n_ttt_layers:
        per_block = 2 * sum(p.numel() for p in model.blocks[-1].parameters())
        ttt_fwd = cfg.n_ttt_layers * (per_block + 4 * min(keys, T) * cfg.n_heads * cfg.head_dim)
        flops += 2 * (ttt_fwd + 2 * cfg.vocab_size * cfg.d_model)
    return flops


# ---- sections --------------------------------------------------------------------------------------
def bench_prefill(models: dict[str, TTTModel], T: int, B: int, args: argparse.Namespace) -> dict[str, Any]:
    vocab = args.vocab
    bufs = [torch.randint(0, vocab, (B, T), device="cuda") for _ in range(args.rotate)]
    out: dict[str, Any] = {"T": T, "B": B}
    for kind, model in models.items():
        if kind == "fa" and T > args.fa_max:
            out[kind] = {"skipped": f"T={T} > --fa-max {args.fa_max}"}
            continue
        try:
            with torch.no_grad(), sdpa_context(kind == "fa"):
                if kind == "e2e":
                    fn = lambda i, m=model: m.prefill(bufs[i % len(bufs)], backend=args.backend)  # noqa: E731
                else:
                    fn = lambda i, m=model: fa_prefill(m, bufs[i % len(bufs)])  # noqa: E731
                ms = cuda_time(fn, warmup=args.warmup, iters=args.iters)
            s = summary(ms)
            s["s_per_1k"] = s["median_ms"] / 1000 / (B * T / 1000)
            s["tflops"] = prefill_flops_per_token(model, T) * B * T / (s["median_ms"] / 1000) / 1e12
            out[kind] = s
        except torch.OutOfMemoryError as e:
            out[kind] = {"error": f"OOM: {str(e)[:200]}"}
        torch.cuda.empty_cache()
    if "e2e" in out and "fa" in out and "s_per_1k" in out["e2e"] and "s_per_1k" in out.get("fa", {}):
        out["fa_over_e2e"] = out["fa"]["s_per_1k"] / out["e2e"]["s_per_1k"]
    return out


def bench_decode(models: dict[str, TTTModel], ctx: int, args: argparse.Namespace) -> dict[str, Any]:
    """Per-token decode latency after a prefill of ``ctx`` tokens (batch 1), host-timed per step."""
    out: dict[str, Any] = {"ctx": ctx}
    prompt = torch.randint(0, args.vocab, (1, ctx), device="cuda")
    for kind, model in models.items():
        if kind == "fa" and ctx > args.fa_max:
            out[kind] = {"skipped": f"ctx={ctx} > --fa-max {args.fa_max}"}
            continue
        try:
            with torch.no_grad(), sdpa_context(kind == "fa"):
                state = model.prefill(prompt, backend=args.backend).state
                steps = []
                it = model.generate_iter(
                    None, state=state, max_new_tokens=args.decode_tokens, temperature=0.0
                )
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in it:
                    torch.cuda.synchronize()
                    t1 = time.perf_counter()
                    steps.append((t1 - t0) * 1000)
                    t0 = t1
            steps = steps[1:]  # the first step includes generator set-up
            out[kind] = {
                "ms_per_token_mean": statistics.fmean(steps),
                "ms_per_token_median": statistics.median(steps),
                "p99_ms": sorted(steps)[max(0, math.ceil(0.99 * len(steps)) - 1)],
                "max_ms": max(steps),
                "n": len(steps),
            }
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            out[kind] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        torch.cuda.empty_cache()
    return out


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


def bench_train(preset: str, T: int, B: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per 1K tokens of one training step (forward + backward): meta_loss vs FA next-token CE."""
    out: dict[str, Any] = {"T": T, "B": B}
    for kind in ("e2e", "fa"):
        try:
            model = build(preset, kind, args.vocab).float().train()
            tok = [torch.randint(0, args.vocab, (B, T + 1), device="cuda") for _ in range(2)]

            def step(i: int, m: TTTModel = model, kind: str = kind, tok: list = tok) -> None:
                x = tok[i % 2]
                with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_context(kind == "fa"):
                    if kind == "e2e":
                        loss = m.meta_loss(x, checkpoint=args.checkpoint)
                    else:
                        logits = m(x[:, :-1])
                        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
                loss.backward()
                m.zero_grad(set_to_none=True)

            ms = cuda_time(step, warmup=1, iters=max(2, args.iters // 3))
            s = summary(ms)
            s["s_per_1k"] = s["median_ms"] / 1000 / (B * T / 1000)
            s["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out[kind] = s
            del model
        except Exception as e:  # noqa: BLE001
            out[kind] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if all("s_per_1k" in out.get(k, {}) for k in ("e2e", "fa")):
        out["e2e_over_fa"] = out["e2e"]["s_per_1k"] / out["fa"]["s_per_1k"]
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="125m")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument(
        "--tokens-per-batch", type=int, default=0, help="constant tokens per batch (0 = batch 1 only)"
    )
    p.add_argument("--systems", nargs="+", default=["e2e", "fa", "swa"])
    p.add_argument("--fa-max", type=int, default=131072, help="longest length to run full attention at")
    p.add_argument("--backend", default="auto", help="attention backend of the TTT/SWA path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rotate", type=int, default=3)
    p.add_argument("--decode", type=int, nargs="*", default=[], help="context lengths for decode timing")
    p.add_argument("--decode-tokens", type=int, default=0, help="tokens to decode (default 2*b + 8)")
    p.add_argument(
        "--train", type=int, default=0, help="sequence length for the training comparison (0 = skip)"
    )
    p.add_argument("--train-batch", type=int, default=1)
    p.add_argument(
        "--checkpoint", action="store_true", help="meta_loss with per-chunk activation checkpointing"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="name the results file latency-<preset>-smoke (the issue-2 smoke run)",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    assert torch.cuda.is_available(), "bench_latency needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = True
    models = {k: build(args.preset, k, args.vocab) for k in args.systems}
    res: dict[str, Any] = run_metadata(vars(args), seed=0)
    res["params"] = {k: n_params(m, embedding=True) for k, m in models.items()}
    res["check"] = check_vs_fp32(args)
    log.info("check %s", res["check"])
    res["prefill_batch1"] = [bench_prefill(models, T, 1, args) for T in args.lengths]
    if args.tokens_per_batch:
        res["prefill_const_tokens"] = [
            bench_prefill(models, T, max(1, args.tokens_per_batch // T), args) for T in args.lengths
        ]
    res["memory"] = [bench_memory(models, T) for T in args.lengths]
    if args.decode:
        args.decode_tokens = args.decode_tokens or 2 * models["e2e"].cfg.ttt_chunk + 8
        res["decode"] = [bench_decode(models, c, args) for c in args.decode]
    del models
    torch.cuda.empty_cache()
    if args.train:
        res["train"] = bench_train(args.preset, args.train, args.train_batch, args)
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    name = args.name or f"latency-{args.preset}-{'smoke' if args.smoke else 'full'}"
    write_results(name, res, args.out)
    log.info("%s", {k: res[k] for k in ("prefill_batch1", "memory") if k in res})
    return res


if __name__ == "__main__":
    main()
