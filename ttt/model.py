"""The TTT-E2E transformer (``ttt-e2e.md`` §1), leaf modules first: RMSNorm, RoPE, attention, SwiGLU,
Block, TTTModel.

Block layout (official code, ``transformer.py:187-229``), each sublayer with its own pre/post RMSNorm:
  prefix block (first L - s):  h += post(attn(pre(h)));  h += post(mlp(pre(h)))
  TTT block (last s):          h += post(attn(pre(h)));  h += post(prime(pre(h)));  h += post(mlp(pre(h)))
The prime SwiGLU's w1/w2/w3 are the fast weights: ``TTTModel`` holds their meta-learned initial value W0,
the per-sequence W_i live in a ``TTTState`` (fp32, one copy per batch row). The test-time-training logic
(prefill, meta_loss, the per-chunk inner step) is in ``ttt/inner.py``; decoding in ``ttt/generate.py``.

Dimension legend: B batch, T tokens, H query heads, Hkv key/value heads, D head_dim, d d_model, f MLP hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ttt.attention import attention, attention_in_window
from ttt.config import ModelConfig
from ttt.state import TTTState

if TYPE_CHECKING:
    from ttt.inner import PrefillOutput

KV = tuple[torch.Tensor, torch.Tensor]
FAST_NAMES = ("w1", "w2", "w3")


def _up(t: torch.Tensor) -> torch.Tensor:
    """Compute dtype of norms/RoPE/softmax: fp32 (fp64 stays fp64, for float64 reference tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ---- fused elementwise kernels (GPU fast path) --------------------------------------------------------
# On CUDA the fp32 norm / RoPE arithmetic runs as one compiled kernel per op instead of ~6 eager kernels each
# (measured: eager elementwise ops were ~60% of a 3b prefill on the H100). Same math, first-order autograd.
# Compiled code has no double backward, so ``meta_loss`` turns them off with ``unfused()``.
_FUSED_OFF: ContextVar[bool] = ContextVar("ttt_unfused", default=False)
_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


# inside ``unfused()`` the norms, RoPE and SwiGLU's gate run ``ttt.ops2``'s twice-differentiable versions: each pass
# (forward, backward, its backward) one fused function, instead of autograd differentiating the eager ops twice op by
# op; False = the eager ops there too
SECOND_ORDER_OPS = True


def second_order_ops() -> bool:
    """Whether the norms, RoPE and SwiGLU's gate run ``ttt.ops2``'s versions: inside ``unfused()``, when
    ``SECOND_ORDER_OPS``."""
    return _FUSED_OFF.get() and SECOND_ORDER_OPS


class unfused:  # noqa: N801 - used like a function: ``with unfused(): ...``
    """No first-order compiled kernels inside this block (needed where gradients of gradients are taken): the
    elementwise ops run eagerly, the norms, RoPE and SwiGLU's gate ``ttt.ops2``'s versions (``second_order_ops``)."""

    def __enter__(self) -> None:
        self._token = _FUSED_OFF.set(True)

    def __exit__(self, *exc: object) -> None:
        _FUSED_OFF.reset(self._token)


def raise_recompile_limit(n: int = 64) -> None:
    """Let one compiled function keep up to ``n`` specialisations (grad mode, dtypes, requires_grad, shapes).

    Dynamo's default of 8 is reached within one 3b prefill (no_grad prefix, grad-mode chunks, caches of growing
    length), after which the function silently runs eagerly (measured on the H100: the norms ran as eager
    kernels, +14% prefill time)."""
    import torch._dynamo

    conf = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(conf, key):
            setattr(conf, key, max(getattr(conf, key), n))


def fused_enabled(x: torch.Tensor) -> bool:
    """Whether compiled kernels apply to ``x``: CUDA, not float64, outside ``unfused()``."""
    return x.is_cuda and x.dtype != torch.float64 and not _FUSED_OFF.get()


def compiled(name: str, fn: Callable[..., Any], dynamic: bool = True) -> Callable[..., Any]:
    """``fn`` compiled once under ``name`` (dynamic shapes unless ``dynamic=False``: one kernel per shape)."""
    if name not in _COMPILED:
        raise_recompile_limit()
        _COMPILED[name] = torch.compile(fn, dynamic=dynamic)
    return _COMPILED[name]


def compiled_on_cuda(name: str, fn: Callable[..., Any], like: torch.Tensor) -> Callable[..., Any]:
    """``fn`` compiled (dynamic shapes) for CUDA tensors that are not float64, ``fn`` itself otherwise, whether or not
    inside ``unfused()``: for the passes of ``ttt.xent`` and ``ttt.ops2``, which autograd never differentiates."""
    return compiled(name, fn) if like.is_cuda and like.dtype != torch.float64 else fn


def _fused(name: str, fn: Callable[..., torch.Tensor], x: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``fn`` compiled (dynamic shapes) for CUDA fp16/bf16/fp32 inputs, else ``fn`` itself."""
    return compiled(name, fn) if fused_enabled(x) else fn


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = _up(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * _up(weight)).to(x.dtype)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x (..., T, D) by precomputed cos/sin (T, D/2) (fused on CUDA; inside ``unfused()`` ``ttt.ops2.rope2``);
    shared by prefill and decode."""
    if second_order_ops():
        from ttt.ops2 import rope2

        return rope2(x, cos, sin, interleaved)
    return _fused("rope", _rope, x)(x, cos, sin, interleaved)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    xf = _up(x)
    D = x.shape[-1]
    if interleaved:
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:
        x0, x1 = xf[..., : D // 2], xf[..., D // 2 :]
        out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype; gain initialised to 1."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``_rms_norm``: compiled on CUDA; inside ``unfused()`` the twice-differentiable ``rms_norm2``."""
    if second_order_ops():
        from ttt.ops2 import rms_norm2

        return rms_norm2(x, weight, eps)
    return _fused("rms_norm", _rms_norm, x)(x, weight, eps)


def apply_rope(x: torch.Tensor, start: int, theta: float, interleaved: bool) -> torch.Tensor:
    """Rotate x (B, H, T, D) for positions start..start+T-1, in fp32.

    ``interleaved`` pairs (x0, x1), (x2, x3), ... (official code); otherwise the first and second halves
    (Hugging Face Llama's ``rotate_half``). Both equal absolute RoPE up to a fixed permutation of D.
    """
    cos, sin = rope_table(start, x.shape[-2], x.shape[-1], theta, x.device, x.dtype)
    return rope_rotate(x, cos, sin, interleaved)


def rope_table(
    start: int, T: int, D: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) (T, D/2) for positions start..start+T-1: angles from float64, then fp32 (fp64 for fp64 x)."""
    inv = theta ** (-torch.arange(0, D, 2, device=device, dtype=torch.float64) / D)
    pos = torch.arange(start, start + T, device=device, dtype=torch.float64)
    ang = (pos[:, None] * inv[None, :]).to(torch.promote_types(dtype, torch.float32))  # (T, D/2)
    return ang.cos(), ang.sin()


# q/k norm + RoPE as one Triton kernel (``ttt/triton_norm_rope.py``) in attention calls that need no gradient (the
# prefix pass): None = on CUDA when Triton is present; True also on CPU under Triton's interpreter (tests)
FUSED_NORM_ROPE: bool | None = None


def _norm_rope_fused(x: torch.Tensor) -> bool:
    from ttt import triton_norm_rope

    if FUSED_NORM_ROPE is False or x.dtype == torch.float64 or _FUSED_OFF.get():
        return False
    if FUSED_NORM_ROPE is None:
        return triton_norm_rope.usable(x)
    return triton_norm_rope.TRITON_AVAILABLE and not (torch.is_grad_enabled() and x.requires_grad)


def _norm(cfg: ModelConfig, dim: int, enabled: bool) -> nn.Module:
    return RMSNorm(dim, cfg.norm_eps) if enabled else nn.Identity()


def _cat_time(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return new if cache.shape[2] == 0 else torch.cat((cache.to(new.dtype), new), dim=2)


@dataclass(kw_only=True)
class CacheWindow:
    """A TTT block's cache for one chunk step held in place (the graphed prefill, ``ttt/graphs.py``): ``k`` and ``v``
    (B, Hkv, n + b, D) are views of preallocated buffers whose first n positions hold the committed keys,
    already RoPE-rotated, and values; the step writes its b new ones into the last b. ``cos``/``sin`` (b, D/2)
    rotate the chunk's queries and keys at positions continuing those of the cached keys."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    # one int32 on the device: window positions before it hold no key yet (a cache still filling up); None = full
    key_lo: torch.Tensor | None = None


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention with QK-norm before RoPE and a KV cache input."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, H * D, bias=False)
        self.wk = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.wv = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.wo = nn.Linear(H * D, cfg.d_model, bias=False)
        self.q_norm = _norm(cfg, D, cfg.qk_norm)
        self.k_norm = _norm(cfg, D, cfg.qk_norm)

    def forward(
        self, x: torch.Tensor, cache: KV | CacheWindow | None, backend: str
    ) -> tuple[torch.Tensor, KV]:
        """x (B, T, d), cache = pre-RoPE (k, v) of earlier tokens or a ``CacheWindow`` -> (out (B, T, d), this
        call's pre-RoPE (k, v))."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if not isinstance(cache, CacheWindow) and _norm_rope_fused(q) and _norm_rope_fused(k):
            o, k = self._attend_fused(q, k, v, cache, backend)
            return self.wo(o.transpose(1, 2).reshape(B, T, -1)), (k, v)
        q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(cache, CacheWindow):  # cached keys rotated once, when written: only the new ones here
            q = rope_rotate(q, cache.cos, cache.sin, cfg.rope_interleaved)
            k_rot = rope_rotate(k, cache.cos, cache.sin, cfg.rope_interleaved)
            o = attention_in_window(
                q, k_rot, v, cache.k, cache.v, window=cfg.window, backend=backend, key_lo=cache.key_lo
            )
        else:
            o = self._attend_cached(q, k, v, cache, backend)  # (B, H, T, D)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1)), (k, v)

    def _attend_fused(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KV | None, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_attend_cached`` on raw projections, their norm and RoPE in one kernel each (no gradients):
        (out (B, H, T, D), the normed pre-RoPE keys (B, Hkv, T, D) the cache keeps)."""
        from ttt.triton_norm_rope import norm_rope

        cfg = self.cfg
        n_cached = 0 if cache is None else cache[0].shape[2]
        cos, sin = rope_table(n_cached, q.shape[2], cfg.head_dim, cfg.rope_theta, q.device, torch.float32)
        qw = self.q_norm.weight if cfg.qk_norm else None
        kw = self.k_norm.weight if cfg.qk_norm else None
        q_rot = norm_rope(q, qw, cfg.norm_eps, cos, sin, cfg.rope_interleaved)[0]
        k_rot, k_normed = norm_rope(k, kw, cfg.norm_eps, cos, sin, cfg.rope_interleaved, want_normed=True)
        assert k_normed is not None
        k_rot, v_all = self._behind_cache(k_rot, v, cache)
        o = attention(q_rot, k_rot, v_all.to(q_rot.dtype), window=cfg.window, backend=backend)  # (B, H, T, D)
        return o, k_normed

    def _behind_cache(
        self, k_rot: torch.Tensor, v: torch.Tensor, cache: KV | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[cache ; new] keys (the cache rotated at its positions 0..n-1) and values, (B, Hkv, n + T, D)."""
        if cache is None or cache[0].shape[2] == 0:
            return k_rot, v
        cfg = self.cfg
        k_cache = apply_rope(cache[0].to(k_rot.dtype), 0, cfg.rope_theta, cfg.rope_interleaved)
        return torch.cat((k_cache, k_rot), 2), _cat_time(cache[1], v)

    def _attend_cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KV | None, backend: str
    ) -> torch.Tensor:
        """Attention of q (B, H, T, D) over [pre-RoPE cache ; k] with positions local to that buffer."""
        cfg = self.cfg
        n_cached = 0 if cache is None else cache[0].shape[2]
        # positions local to the [cache ; new] buffer: RoPE depends only on offsets (official attention.py:350)
        q = apply_rope(q, n_cached, cfg.rope_theta, cfg.rope_interleaved)
        k_rot = apply_rope(k, n_cached, cfg.rope_theta, cfg.rope_interleaved)
        # cache and new keys rotated apart: the backward of a chunk step skips the (detached) cache
        k_rot, v_all = self._behind_cache(k_rot, v, cache)  # (B, Hkv, n_cached + T, D)
        return attention(q, k_rot, v_all.to(q.dtype), window=cfg.window, backend=backend)  # (B, H, T, D)


# On CUDA, SwiGLU's silu(a) * b and each sublayer's x + post_norm(a) run as one compiled kernel each instead of two
# (eager silu + mul; compiled norm + eager add): one write and one read of the (T, f) or (T, d) activation fewer.
# False keeps the separate ops (eval.bench_latency --unfused-block-ops times both in one run).
FUSED_BLOCK_OPS = True


def _silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b (one compiled kernel on CUDA when ``FUSED_BLOCK_OPS``; inside ``unfused()`` ``ttt.ops2.silu_mul2``)."""
    if second_order_ops():
        from ttt.ops2 import silu_mul2

        return silu_mul2(a, b)
    return _fused("silu_mul", _silu_mul, a)(a, b) if FUSED_BLOCK_OPS else _silu_mul(a, b)


def _add_rms_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x + _rms_norm(a, weight, eps)


def add_post(x: torch.Tensor, a: torch.Tensor, post: nn.Module) -> torch.Tensor:
    """The residual update x + post(a) (one compiled kernel on CUDA for an RMSNorm post when ``FUSED_BLOCK_OPS``)."""
    if FUSED_BLOCK_OPS and isinstance(post, RMSNorm) and fused_enabled(a):
        return compiled("add_rms_norm", _add_rms_norm)(x, a, post.weight, post.eps)
    return x + post(a)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu_mul(self.w1(x), self.w3(x)))


def swiglu_batched(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """SwiGLU with per-row weights: x (B, T, d), w1/w3 (B, f, d), w2 (B, d, f) -> (B, T, d).

    Computed as W @ x^T (features-major), so the weight gradients of the TTT step come out in the weights' own
    row-major layout: with ``x @ W^T`` they were transposed views, and every fp32 op of the update (clip,
    SGD, copies) then ran the strided elementwise kernels (H100 profile, 3b: ~9 ms of a ~60 ms chunk step).
    """
    xt = x.transpose(1, 2)  # (B, d, T)
    h1 = w["w1"].to(x.dtype) @ xt  # (B, f, T)
    h3 = w["w3"].to(x.dtype) @ xt  # (B, f, T)
    return (w["w2"].to(x.dtype) @ silu_mul(h1, h3)).transpose(1, 2).contiguous()  # (B, T, d)


class Block(nn.Module):
    """Sandwich-norm transformer block; TTT blocks insert the prime (fast-weight) MLP after attention."""

    def __init__(self, cfg: ModelConfig, has_prime: bool) -> None:
        super().__init__()
        d = cfg.d_model
        self.attn_norm, self.attn_post = _norm(cfg, d, cfg.pre_norm), _norm(cfg, d, cfg.post_norm)
        self.attn = Attention(cfg)
        self.has_prime = has_prime
        if has_prime:
            self.prime_norm, self.prime_post = _norm(cfg, d, cfg.pre_norm), _norm(cfg, d, cfg.post_norm)
            self.prime = SwiGLU(d, cfg.prime_hidden)
        self.mlp_norm, self.mlp_post = _norm(cfg, d, cfg.pre_norm), _norm(cfg, d, cfg.post_norm)
        self.mlp = SwiGLU(d, cfg.mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        cache: KV | CacheWindow | None,
        backend: str,
        fast: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """fast = per-row prime weights {w1, w2, w3} (B, ...); None = the module's own W0 (shared)."""
        a, kv = self.attn(self.attn_norm(x), cache, backend)
        x = add_post(x, a, self.attn_post)
        if self.has_prime:
            p = self.prime_norm(x)
            x = add_post(x, self.prime(p) if fast is None else swiglu_batched(p, fast), self.prime_post)
        x = add_post(x, self.mlp(self.mlp_norm(x)), self.mlp_post)
        return x, kv


class TTTModel(nn.Module):
    """TTT-E2E language model. ``model(tokens)`` is the plain SWA forward (fast weights = W0, no update)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        first_ttt = cfg.n_prefix_layers
        self.blocks = nn.ModuleList(Block(cfg, has_prime=i >= first_ttt) for i in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: every linear (W0 included) and the embedding ~ N(0, std^2); norm gains 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    # ---- pieces shared by forward / prefill / meta_loss -------------------------------------------
    def fast_names(self) -> list[str]:
        """State keys of the fast weights, e.g. ``blocks.3.prime.w1``."""
        return [
            f"blocks.{i}.prime.{n}"
            for i in range(self.cfg.n_prefix_layers, self.cfg.n_layers)
            for n in FAST_NAMES
        ]

    def initial_fast(self, batch_size: int) -> dict[str, torch.Tensor]:
        """W0 broadcast to (B, ...) views (differentiable w.r.t. the parameters)."""
        out = {}
        for name in self.fast_names():
            w = self.get_parameter(name + ".weight")
            out[name] = w.unsqueeze(0).expand(batch_size, *w.shape)
        return out

    def block_fast(self, fast: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        return {n: fast[f"blocks.{i}.prime.{n}"] for n in FAST_NAMES}

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(tokens)  # (B, T, d)

    def head(self, h: torch.Tensor, up: bool = True) -> torch.Tensor:
        """Final norm + (tied) output projection; logits up-cast to fp32 (``up``). (B, T, d) -> (B, T, V)."""
        h = self.ln_f(h)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, w)
        return _up(logits) if up else logits

    def run_blocks(
        self,
        h: torch.Tensor,
        layers: range,
        kv: list[KV] | list[CacheWindow] | None,
        backend: str,
        fast: dict[str, torch.Tensor] | None = None,
        keep: int | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Run blocks ``layers`` over h (B, T, d) with optional caches; returns h and each block's new (k, v).

        ``keep``: return only each block's last ``keep`` keys/values (copied, so a long input's full K/V are
        freed layer by layer: a 1M-token prefill would otherwise hold every prefix layer's K/V at once).
        """
        new_kv = []
        for j, i in enumerate(layers):
            bf = self.block_fast(fast, i) if (fast is not None and self.blocks[i].has_prime) else None
            h, kvi = self.blocks[i](h, None if kv is None else kv[j], backend, bf)
            if keep is not None and kvi[0].shape[2] > keep:
                kvi = (
                    kvi[0][:, :, kvi[0].shape[2] - keep :].clone(),
                    kvi[1][:, :, kvi[1].shape[2] - keep :].clone(),
                )
            new_kv.append(kvi)
        return h, new_kv

    def forward(self, tokens: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Plain sliding-window forward, no test-time update: tokens (B, T) -> logits (B, T, V) fp32."""
        check_tokens(tokens, self.cfg)
        h, _ = self.run_blocks(self.embed(tokens), range(self.cfg.n_layers), None, backend)
        return self.head(h)

    def state_signature(self) -> dict[str, Any]:
        c = self.cfg
        keys = ("vocab_size", "d_model", "n_layers", "n_ttt_layers", "n_kv_heads", "head_dim", "prime_hidden")
        return {k: getattr(c, k) for k in keys} | {"window": c.window, "ttt_chunk": c.ttt_chunk}

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> TTTState:
        """Fresh state: fast weights = W0 (fp32 copies per row), empty caches, nothing pending."""
        c = self.cfg
        device = device if device is not None else self.tok_emb.weight.device
        dtype = self.tok_emb.weight.dtype
        fast_dtype = torch.promote_types(dtype, torch.float32)  # fp32 fast weights (fp64 in fp64 tests)
        empty = torch.zeros(batch_size, c.n_kv_heads, 0, c.head_dim, device=device, dtype=dtype)
        return TTTState(
            fast={k: v.detach().to(fast_dtype).clone() for k, v in self.initial_fast(batch_size).items()},
            kv=[(empty, empty) for _ in range(c.n_layers)],
            pending_h=torch.zeros(batch_size, 0, c.d_model, device=device, dtype=dtype),
            pending_tokens=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            pos=0,
            signature=self.state_signature(),
        )

    # ---- test-time training, generation, checkpoints (implemented in sibling modules) --------------
    def prefill(
        self, tokens: torch.Tensor, state: TTTState | None = None, backend: str = "auto"
    ) -> PrefillOutput:
        """Read tokens with TTT; see ``ttt.inner.prefill``."""
        from ttt.inner import prefill

        return prefill(self, tokens, state, backend=backend)

    def meta_loss(
        self, tokens: torch.Tensor, *, checkpoint: bool = False, ilr_scale: float = 1.0
    ) -> torch.Tensor:
        """Second-order meta-training loss of tokens (B, T+1); see ``ttt.inner.meta_loss``."""
        from ttt.inner import meta_loss

        return meta_loss(self, tokens, checkpoint=checkpoint, ilr_scale=ilr_scale)

    def generate(self, prompt: torch.Tensor, state: TTTState | None = None, **kw: Any) -> torch.Tensor:
        """Decode up to max_new_tokens -> (B, n_new); see ``ttt.generate.generate``."""
        from ttt.generate import generate

        return generate(self, prompt, state, **kw)

    def generate_iter(
        self, prompt: torch.Tensor, state: TTTState | None = None, **kw: Any
    ) -> Iterator[torch.Tensor]:
        """Yield (B,) token tensors one decode step at a time; see ``ttt.generate.generate_iter``."""
        from ttt.generate import generate_iter

        return generate_iter(self, prompt, state, **kw)

    def save_pretrained(self, path: str | Path, tokenizer: Any = None) -> None:
        from ttt.checkpoint import save_pretrained

        save_pretrained(self, path, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TTTModel:
        from ttt.checkpoint import from_pretrained

        return from_pretrained(path, device=device, dtype=dtype)

    @classmethod
    def from_hf(cls, path: str | Path, **overrides: Any) -> TTTModel:
        """Import a local Hugging Face Llama checkpoint dir; see ``ttt.hf.from_hf``."""
        from ttt.hf import from_hf

        return from_hf(path, **overrides)


def check_tokens(tokens: torch.Tensor, cfg: ModelConfig, min_len: int = 1) -> None:
    """Raise TypeError/ValueError unless tokens is an integer (B, T) tensor of ids in [0, vocab_size)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of shape (B, T), got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be an int64/int32 tensor (LongTensor), got {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, T), got {tuple(tokens.shape)}")
    if tokens.shape[0] < 1 or tokens.shape[1] < min_len:
        raise ValueError(f"tokens must have B >= 1 and T >= {min_len}, got {tuple(tokens.shape)}")
    if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # reading min/max would sync with the host, which a CUDA graph capture forbids
    if tokens.is_meta:
        return  # shapes only (FLOP counting, eval/flops.py): no ids to check
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got min {lo} max {hi}")
