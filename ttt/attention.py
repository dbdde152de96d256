"""Causal (sliding-window) attention behind one function, with interchangeable backends.

Queries are the *last* ``Tq`` positions of the ``Tk`` keys (lower-right aligned): query i sits at key
position ``Tk - Tq + i``. Key j is visible to query i when ``j <= pos(i)`` and ``pos(i) - j < window``
(the window counts the query token itself; ``window=None`` = full causal attention).

Backends:
- ``"math"``: explicit matmul-softmax. Differentiable to any order (needed inside ``meta_loss``).
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``. Uses the fused causal kernels
  (``is_causal`` / ``causal_lower_right``) when the window covers every key, else an explicit band mask.
- ``"flash"``: flash-attn's ``window_size`` (CUDA, fp16/bf16 only), when importable.
- ``"auto"``: flash when usable, else sdpa.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional: pip install 'ttt-rag[gpu]'
    from flash_attn import flash_attn_func as _flash_attn_func

    FLASH_ATTN_AVAILABLE = True
except Exception:  # pragma: no cover - flash-attn absent on CPU machines
    _flash_attn_func = None
    FLASH_ATTN_AVAILABLE = False

BACKENDS = ("auto", "math", "sdpa", "flash")
# sdpa with a band mask runs query blocks of this size, so the boolean mask stays (block, block + window)
# instead of (T, T); the GPU fast path (FlexAttention) can replace this
SDPA_QUERY_BLOCK = 4096


def band_mask(tq: int, tk: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [Tq, Tk] mask, True = visible, for lower-right aligned causal (sliding-window) attention."""
    assert tk >= tq, f"need at least as many keys as queries, got Tq={tq} Tk={tk}"
    qpos = torch.arange(tk - tq, tk, device=device)[:, None]  # (Tq, 1)
    kpos = torch.arange(tk, device=device)[None, :]  # (1, Tk)
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (qpos - kpos < window)
    return mask


def _window_covers_all(tq: int, tk: int, window: int | None) -> bool:
    # the largest query-key distance is Tk - 1 (last query, first key)
    return window is None or window >= tk


def _expand_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    rep = n_heads // k.shape[1]
    return k if rep == 1 else k.repeat_interleave(rep, dim=1)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    tq, tk = q.shape[2], k.shape[2]
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Tq, Tk)
    mask = band_mask(tq, tk, window, q.device)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return probs @ v  # (B, H, Tq, D)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if _window_covers_all(tq, tk, window):
        if tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(tq, tk), enable_gqa=gqa)
    blk = max(256, min(window, SDPA_QUERY_BLOCK)) if SDPA_QUERY_BLOCK >= 256 else SDPA_QUERY_BLOCK
    if tq > blk:  # bound the explicit mask: query blocks against only the keys they can see
        outs = []
        for s in range(0, tq, blk):
            e = min(s + blk, tq)
            k_hi = tk - tq + e  # keys up to the block's last query
            k_lo = max(0, k_hi - (e - s) - window + 1)  # and back to its first query's window
            outs.append(_sdpa_attention(q[:, :, s:e], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi], window))
        return torch.cat(outs, dim=2)
    mask = band_mask(tq, tk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    assert _flash_attn_func is not None, "flash-attn is not installed: pip install 'ttt-rag[gpu]'"
    ws = (-1, -1) if window is None else (window - 1, 0)
    # flash-attn takes (B, T, H, D) and aligns causal masks bottom-right when Tq != Tk
    out = _flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window_size=ws
    )
    return out.transpose(1, 2)


def flash_usable(q: torch.Tensor) -> bool:
    return FLASH_ATTN_AVAILABLE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None, backend: str = "auto"
) -> torch.Tensor:
    """Causal sliding-window attention. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) -> (B, H, Tq, D)."""
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, (
        f"need 4-d q/k/v, got {q.shape} {k.shape} {v.shape}"
    )
    assert q.shape[1] % k.shape[1] == 0, f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}"
    assert k.shape[2] >= q.shape[2], f"keys ({k.shape[2]}) must include the queries ({q.shape[2]})"
    if backend == "auto":
        backend = "flash" if flash_usable(q) else "sdpa"
    if backend == "math":
        return _math_attention(q, k, v, window)
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, window)
    if backend == "flash":
        return _flash_attention(q, k, v, window)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run on this device/dtype (used by the backend-equivalence test)."""
    out = ["math", "sdpa"]
    if (
        FLASH_ATTN_AVAILABLE
        and torch.device(device).type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
    ):
        out.append("flash")
    return out
