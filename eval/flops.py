"""Model FLOPs of a prefill: what the method has to compute, term by term (the MFU numerator of
``eval.bench_latency``).

Counted: the matmuls a prefill needs (2 FLOPs per multiply-add). Not counted: recomputation (a fused attention
backward re-forms its scores), masked work (a kernel's partial blocks, the explicit path's dense band), the
elementwise ops, norms and the SGD step. ``tests/test_flops.py`` counts the matmuls the code actually runs
(a dispatch-mode counter over the explicit CPU path) and checks every linear and head term against them exactly.

The inner step of chunk i (``ttt.inner.suffix_chunk_step``) differentiates the chunk's NLL with respect to the
prime (fast) MLPs of the ``n`` TTT blocks only. Its backward therefore needs:

- the head: the gradient of its input (2 V d per token), never of its weight;
- every TTT block: the gradient through its static MLP (2 P_mlp), the prime weights' gradients (2 P_prime) and
  the gradient through the prime's down projection (2 d f') that they start from;
- every TTT block but the first: the gradient through the prime's gate and up projections (4 d f'), the q/k/v/o
  projections (2 P_attn) and attention (dP and dQ over all visible keys, 4 keys Dh per head; dK and dV only for
  the chunk's own keys, the cached ones being constants: 2 (b + 1) Dh per head). The first TTT block's
  attention lies below every fast weight: no gradient goes through it.

Training (``train_matmul_flops``) is counted rather than derived: one step's matmuls run on the meta device (shapes
only, no memory), the explicit path, with autograd computing only the gradients the step needs.

A prefill of T tokens takes an inner step for its ``b * floor((T - 1) / b)`` first tokens: the last chunk waits for
its final target (``ttt.inner.prefill``). Full-attention and SWA prefills (``bench_latency.fa_prefill``) apply the
head to the last position only.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ttt import ModelConfig, TTTModel

FORMULAS = {
    "prefill_flops_per_token": (
        "2*P_lin (every block's q/k/v/o + MLPs + prime MLPs) + 4*keys*H*Dh*L (attention) + 2*V*d (head; FA/SWA: "
        "last position only) + c/T * [2*V*d (head input grad) + n*(2*P_mlp + 2*P_prime + 2*d*f') + (n-1)*(4*d*f' "
        "+ 2*P_attn + H*Dh*(4*keys + 2*(b+1)))] (inner backward, c = b*floor((T-1)/b) tokens updated), keys = "
        "mean visible keys per query = mean of min(t+1, window); eval/flops.py derives each term"
    ),
}


def mean_keys(T: int, window: int | None) -> float:
    """Mean number of keys a causal query sees over positions 0..T-1: mean of min(t + 1, window)."""
    w = T if window is None else min(window, T)
    return (w * (w + 1) / 2 + (T - w) * w) / T


def block_params(cfg: ModelConfig) -> dict[str, int]:
    """Weights of one block's matmuls: attention projections, the static MLP, the prime MLP (norms left out)."""
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"attn": 2 * d * q + 2 * d * kv, "mlp": 3 * d * cfg.mlp_hidden, "prime": 3 * d * cfg.prime_hidden}


def committed_tokens(cfg: ModelConfig, T: int) -> int:
    """Tokens of a T-token prefill (from an empty state) that an inner step trains on."""
    return cfg.ttt_chunk * ((T - 1) // cfg.ttt_chunk) if cfg.n_ttt_layers else 0


def prefill_flops(cfg: ModelConfig, T: int) -> dict[str, float]:
    """Model FLOPs per token of a batch-1 prefill of T tokens from an empty state, by term (module docstring)."""
    assert T >= 1, f"T must be >= 1, got {T}"
    p, n, d, V = block_params(cfg), cfg.n_ttt_layers, cfg.d_model, cfg.vocab_size
    hd, f = cfg.n_heads * cfg.head_dim, cfg.prime_hidden
    keys = mean_keys(T, cfg.window)
    out = {
        "linear": 2.0 * (cfg.n_layers * (p["attn"] + p["mlp"]) + n * p["prime"]),
        "attention": 4.0 * keys * hd * cfg.n_layers,
        "head": 2.0 * V * d if n else 2.0 * V * d / T,
        "inner_head": 0.0,
        "inner_linear": 0.0,
        "inner_attention": 0.0,
    }
    if n:
        share = committed_tokens(cfg, T) / T
        out["inner_head"] = share * 2.0 * V * d
        out["inner_linear"] = share * (
            n * (2 * p["mlp"] + 2 * p["prime"] + 2 * d * f) + (n - 1) * (4 * d * f + 2 * p["attn"])
        )
        out["inner_attention"] = share * (n - 1) * hd * (4 * keys + 2 * (cfg.ttt_chunk + 1))
    return out


def prefill_flops_per_token(cfg: ModelConfig, T: int) -> float:
    """The sum of ``prefill_flops``."""
    return sum(prefill_flops(cfg, T).values())


class MatmulFlops(TorchDispatchMode):
    """FLOPs of every aten matmul run under it (torch's own per-op formulas), in two bins: ``linear`` (2-D products,
    and batched ones whose batch is ``batch``: the prime MLPs' per-sequence fast weights) and ``batched`` (every
    other batched product: attention's (B * H) ones, on the explicit path a dense masked band)."""

    def __init__(self, batch: int = 1) -> None:
        super().__init__()
        self.batch = batch
        self.flops: collections.Counter[str] = collections.Counter()
        from torch.utils.flop_counter import FlopCounterMode

        self._registry = FlopCounterMode(display=False).flop_registry

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = func._overloadpacket
        if packet in self._registry:
            first = args[1] if packet is torch.ops.aten.addmm else args[0]
            linear = first.dim() == 2 or first.shape[0] == self.batch
            self.flops["linear" if linear else "batched"] += self._registry[packet](*args, **(kwargs or {}),
                                                                                     out_val=out)  # fmt: skip
        return out


def train_matmul_flops(cfg: ModelConfig, T: int, loss: Callable[[TTTModel, torch.Tensor], torch.Tensor],
                       batch: int = 1) -> dict[str, float]:  # fmt: skip
    """Matmul FLOPs per token of one training step ``loss(model, tokens (batch, T + 1)).backward()``, counted on the
    meta device (shapes only: a 3b step at 8K counts in seconds on a CPU). ``linear``: every matmul but attention's,
    exactly what the step computes (autograd takes only the gradients it needs); ``attention_explicit``: attention
    as the explicit path computes it (the whole masked band: an upper bound)."""
    with torch.device("meta"):
        model = TTTModel(cfg).train()
    tokens = torch.zeros(batch, T + 1, dtype=torch.long, device="meta")
    with MatmulFlops(batch) as counter:
        loss(model, tokens).backward()
    n = batch * T
    return {"linear": counter.flops["linear"] / n, "attention_explicit": counter.flops["batched"] / n}
