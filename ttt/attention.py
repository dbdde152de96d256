"""Causal (sliding-window) attention behind one function, with interchangeable backends.

Queries are the *last* ``Tq`` positions of the ``Tk`` keys (lower-right aligned): query i sits at key
position ``Tk - Tq + i``. Key j is visible to query i when ``j <= pos(i)`` and ``pos(i) - j < window``
(the window counts the query token itself; ``window=None`` = full causal attention).

Backends:
- ``"math"``: explicit matmul-softmax. Differentiable to any order (needed inside ``meta_loss``).
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``. Uses the fused causal kernels
  (``is_causal`` / ``causal_lower_right``) when the window covers every key, else an explicit band mask.
- ``"flash"``: flash-attn's ``window_size`` (CUDA, fp16/bf16 only), when importable.
- ``"fa2"``: PyTorch's own FlashAttention-2 kernel (``aten._flash_attention_forward``) with its ``window_size``
  arguments: the exact band, lower-right aligned, fused forward and backward, no compile, no flash-attn package
  (CUDA sm80+, fp16/bf16, head dim a multiple of 8 up to 256). First-order only.
- ``"flex"``: FlexAttention with a block mask built once per shape (``create_block_mask(_compile=True)``) and
  a compiled kernel: the exact band at fused speed (gpu-notes: 412 TFLOP/s for the 128K prefix on the H100).
  Chunk-shaped calls (``Tq <= window``) left-pad the keys to ``Tq + window - 1`` so every chunk of a sequence
  reuses one kernel; padded and out-of-band blocks are skipped by the block mask. First-order only.
- ``"band"``: the exact band as two square causal passes of cuDNN's fused kernel (each query block over its own keys;
  time-reversed, over the previous block's) merged by their log-sum-exps. Forward only, for the long prefix pass
  (``LONG_BACKEND = "band"`` opts in; H100, 3b: 41.5 ms per 128K layer vs Flex 37.7 ms and triton 27.6 ms).
- ``"triton"``: our Triton band kernels (``ttt/triton_band.py``): exact head dims (80 = 64 + 16, no padding), a
  backward that returns dK/dV only where asked. First-order; CUDA fp16/bf16 (or Triton's CPU interpreter). In a
  TTT chunk step (``attention_in_window``) its backward skips the committed keys' dK/dV, which FA-2 computes.
- ``"triton2"``: the same forward and backward, whose backward is differentiable once more by three more fused
  kernels (``ttt/triton_band2.py``): what ``meta_loss`` runs on CUDA instead of ``"math"``. Head dims split as for
  ``"triton"``; under CUDA autocast, fp32 inputs run in the autocast dtype.
- ``"auto"``: flash when usable; sdpa (fused causal kernels) when the window covers every key; otherwise
  ``LONG_BACKEND`` / ``CHUNK_BACKEND`` (triton by default, measured fastest; then fa2, flex) by input length, see
  ``auto_backend``.

``key_pad`` (every backend): the first ``key_pad`` keys are padding and never visible (a constant-shape cache).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

try:  # optional: pip install 'ttt-rag[gpu]'
    from flash_attn import flash_attn_func as _flash_attn_func

    FLASH_ATTN_AVAILABLE = True
except Exception:  # pragma: no cover - flash-attn absent on CPU machines
    _flash_attn_func = None
    FLASH_ATTN_AVAILABLE = False

BACKENDS = ("auto", "math", "sdpa", "flash", "fa2", "flex", "band", "triton", "triton2")
# calls per resolved backend since the last reset (benchmarks report which kernels actually ran)
BACKEND_CALLS: Counter[str] = Counter()
# sdpa with a band mask runs query blocks of this size, so the boolean mask stays (block, block + window)
# instead of (T, T); the GPU fast path (FlexAttention) can replace this
SDPA_QUERY_BLOCK = 4096
FLEX_MIN_QUERIES = 16384  # auto: flex for whole-sequence calls only from this many queries (see auto_backend)
# auto's first choice when the window cuts keys off ("triton", "flex", "fa2" or "band"): for inputs of at least
# FLEX_MIN_QUERIES queries (the prefix pass of a long input), and for shorter calls (TTT chunks, prompts); when it
# cannot run, fa2 then flex. H100, 3b shape, one call (eval/results/attention-kernels-triton-s11.json):
# - one 128K prefix layer: triton 27.6 ms, flex 37.7, band 41.5, fa2 46.5;
# - a chunk step's attention (1,024 queries over 9,215 keys, gradients for q and the new keys, as the step takes
#   them): triton 0.93 ms, FA-2 forward + our backward 1.02, fa2 1.65 (it computes dK/dV for all 9,215 keys);
# - 128K prefill end to end: 0.0332 s per 1K tokens against 0.0418 with flex + fa2 (latency-3b-s11-*.json).
# Triton compiles per head-dim split and block config, not per length, so prompts of any length reuse its kernels.
LONG_BACKEND = "triton"
CHUNK_BACKEND = "triton"
# forward kernel of the "triton" chunk path in attention_in_window: "triton" (ours: 0.32 ms per 3b chunk vs FA-2's
# 0.45) or "fa2" (FA-2's forward, whose log-sum-exp feeds our backward just the same)
TRITON_WINDOW_FWD = "triton"


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


def _masked_scores(q: torch.Tensor, k: torch.Tensor, window: int | None) -> torch.Tensor:
    """Scaled scores (B, H, Tq, Tk) in at least fp32, -inf outside the band; k already has q's heads."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Tq, Tk)
    mask = band_mask(q.shape[2], k.shape[2], window, q.device)
    return scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~mask, float("-inf"))


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    probs = torch.softmax(_masked_scores(q, k, window), dim=-1).to(v.dtype)
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


@functools.cache
def fa2_supported() -> bool:
    """Whether this torch build's ``aten._flash_attention_forward`` takes window sizes."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    return op is not None and "window_size_left" in str(op.default._schema)


def _fa2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """PyTorch's built-in FlashAttention-2 with a sliding window (bottom-right aligned when Tq != Tk, like
    flash-attn): key j visible to query i iff 0 <= pos(i) - j <= window - 1. Autograd: FlashAttentionBackward0."""
    return _fa2_forward_lse(q, k, v, window)[0]  # (B, H, Tq, D)


def _fa2_forward_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA-2's forward with its log-sum-exp: (out (B, H, Tq, D), lse (B, H, Tq) fp32, natural log)."""
    tq, tk = q.shape[2], k.shape[2]
    left = -1 if _window_covers_all(tq, tk, window) else window - 1  # type: ignore[operator]
    # (B, H, T, D) -> the kernel's (B, T, H, D); GQA is native (Hkv divides H)
    out, lse = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, tq, tk, 0.0, True, False,
        window_size_left=left, window_size_right=0,
    )[:2]  # fmt: skip
    return out.transpose(1, 2), lse[:, :, :tq]


def _triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    from ttt import triton_band

    return triton_band.band_attention(q, k, v, window)


def triton_usable(q: torch.Tensor) -> bool:
    """``ttt.triton_band`` takes q: Triton importable, CUDA half precision, a split head dim (auto's test)."""
    from ttt import triton_band

    return triton_band.usable(q)


# ---- FlexAttention ---------------------------------------------------------------------------------
_MASK_MODS: dict[tuple, tuple] = {}  # (Tq, Tk, window, device) -> (mask_mod, its key_pad buffer)
_PAD_IN_BUFFER: dict[int, int] = {}  # id(key_pad buffer) -> the value it holds (skips redundant fills)
_BLOCK_MASKS: dict[tuple, object] = {}  # ... + key_pad -> BlockMask
_BLOCK_MASK_CACHE = 64


def _flex_kernel():
    """flex_attention compiled once (dynamic=False: one kernel per shape; chunk shapes are constant)."""
    from torch.nn.attention.flex_attention import flex_attention

    from ttt.model import compiled

    # one compile per distinct (Tq, Tk): the prefix lengths of a benchmark sweep plus the chunk shape
    return compiled("flex_attention", flex_attention, dynamic=False)


def _mask_mod(tq: int, tk: int, window: int | None, device: torch.device) -> tuple:
    """One mask function per shape, reading key_pad from a device buffer: every pad value shares one kernel."""
    key = (tq, tk, window, str(device))
    if key not in _MASK_MODS:
        pad_buf = torch.zeros((), dtype=torch.int32, device=device)
        offset = tk - tq  # query i sits at key position i + offset

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex's mask_mod signature
            qpos = q_idx + offset
            ok = (kv_idx <= qpos) & (kv_idx >= pad_buf)
            return ok if window is None else ok & (qpos - kv_idx < window)

        _MASK_MODS[key] = (mask_mod, pad_buf)
    return _MASK_MODS[key]


def _block_mask(tq: int, tk: int, window: int | None, pad: int, device: torch.device) -> object:
    """Cached BlockMask (which 128x128 blocks to skip / compute fully / mask) for one shape and pad."""
    mask_mod, pad_buf = _mask_mod(tq, tk, window, device)
    if _PAD_IN_BUFFER.get(id(pad_buf)) != pad:
        # in stream order, the kernels that follow read this pad. Through .data: the buffer is saved for the
        # backward of earlier calls, which all ran (and were differentiated) with their own pad before this
        # change; every call of one autograd graph (the TTT blocks of a chunk) shares one pad.
        pad_buf.data.fill_(pad)
        _PAD_IN_BUFFER[id(pad_buf)] = pad
    key = (tq, tk, window, str(device), pad)
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        from torch.nn.attention.flex_attention import create_block_mask

        bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=tq, KV_LEN=tk, device=device, _compile=True)
        if len(_BLOCK_MASKS) >= _BLOCK_MASK_CACHE:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        _BLOCK_MASKS[key] = bm
    return bm


def _flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, pad: int
) -> torch.Tensor:
    tq, tk = q.shape[2], k.shape[2]
    if window is not None:
        need = tq + window - 1  # keys any query can see, counted back from the last one
        if tk - pad > need:  # drop keys no query can see
            k, v, tk, pad = k[:, :, tk - need :], v[:, :, tk - need :], need, 0
        elif tq < window and tk < need:  # chunk shape: left-pad to a constant key length
            extra = need - tk
            k, v = F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))
            tk, pad = need, pad + extra
    bm = _block_mask(tq, tk, window, pad, q.device)
    gqa = q.shape[1] != k.shape[1]
    return _flex_kernel()(q, k.to(q.dtype), v.to(q.dtype), block_mask=bm, enable_gqa=gqa)


def _half_on_cuda(q: torch.Tensor, max_head_dim: int) -> bool:
    """What the fused fp16/bf16 kernels (fa2, cuDNN) share: CUDA, half precision, head dim a multiple of 8."""
    D = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= max_head_dim


# ---- band from two causal passes (long prefix, forward only) -------------------------------------------
def _causal_lse_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Square causal attention (N, H, T, D) -> (out (N, H, T, D), log-sum-exp of the scaled scores (N, H, T))."""
    scores = _masked_scores(q, k, None)  # (N, H, T, T): square, so window None is causal
    lse = torch.logsumexp(scores, dim=-1)  # (N, H, T)
    return (torch.exp(scores - lse[..., None]).to(v.dtype) @ v), lse


def _causal_lse_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's fused causal attention with its log-sum-exp (natural log of the scaled scores' sum)."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[:2]
    return out, lse.reshape(q.shape[:3]).float()  # lse: (N, H, T) whatever trailing 1 the build adds


def _blocks(t: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, n*w, D) -> (B*n, H, w, D): one batch row per block of w positions."""
    B, H, T, D = t.shape
    return t.view(B, H, T // w, w, D).transpose(1, 2).reshape(B * (T // w), H, w, D)


def band_split_ok(tq: int, tk: int, window: int | None) -> bool:
    """Shapes ``_band_attention`` takes: a window that cuts keys off, and either no cached keys or at least w - 1
    of them (a prefill segment after the first carries exactly w - 1)."""
    return (
        window is not None
        and window >= 2
        and not _window_covers_all(tq, tk, window)
        and (tk == tq or tk - tq >= window - 1)
    )


def _band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal_lse: Callable = _causal_lse_cudnn
) -> torch.Tensor:
    """The exact sliding-window band as two square *causal* passes merged by their log-sum-exps, so the fastest
    fused causal kernel (cuDNN on the H100) does the work. Queries in blocks of w: block i sees its own keys
    causally (pass A) and key j of the previous block when j > its offset (pass B: both blocks reversed in time,
    that strict upper triangle is causal again over w - 1 keys). Forward only."""
    assert band_split_ok(q.shape[2], k.shape[2], window), (
        f"band split takes Tq=Tk or >= w-1 cached keys, got {q.shape} {k.shape}"
    )
    B, H, tq, D = q.shape
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    w, o = window, min(k.shape[2] - tq, window - 1)  # cached keys kept: the last w - 1 are all any query sees
    k, v = k[:, :, k.shape[2] - tq - o :], v[:, :, v.shape[2] - tq - o :]
    n = -(-tq // w)
    pad = n * w - tq  # queries (and their keys) padded at the end: later than every real query, never seen
    q, k, v = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v))
    up = torch.promote_types(q.dtype, torch.float32)  # merge in fp32 (fp64 stays fp64: the CPU reference)
    out_a, lse_a = causal_lse(_blocks(q, w), _blocks(k[:, :, o:], w), _blocks(v[:, :, o:], w))
    out = out_a.to(up).reshape(B, n, H, w, D)
    lse_a = lse_a.reshape(B, n, H, w)
    del out_a
    # previous key block of every query block: with w - 1 cached keys block 0 has one (zero) key in front that
    # no query sees (j = 0 > offset never holds); without a cache block 0 has none and drops out of pass B
    first = 0 if o else 1
    kp, vp = (F.pad(t, (0, 0, 1, 0))[:, :, : n * w] if o else t[:, :, : (n - 1) * w] for t in (k, v))
    m = n - first
    qb, kb, vb = (_blocks(t, w) for t in (q[:, :, first * w :], kp, vp))  # (B*m, H, w, D)
    out_b, lse_b = causal_lse(qb[:, :, : w - 1].flip(2), kb[:, :, 1:].flip(2), vb[:, :, 1:].flip(2))
    del qb, kb, vb
    out_b = out_b.flip(2).to(up).reshape(B, m, H, w - 1, D)  # query offsets 0 .. w - 2, in time order
    lse_b = lse_b.flip(2).reshape(B, m, H, w - 1)
    la = lse_a[:, first:, :, : w - 1]  # (B, m, H, w - 1): the rows pass B reaches
    lse = torch.logaddexp(la, lse_b)
    oa = out[:, first:, :, : w - 1]
    oa.mul_(torch.exp(la - lse)[..., None]).add_(out_b.mul_(torch.exp(lse_b - lse)[..., None]))
    out = out.transpose(1, 2).reshape(B, H, n * w, D)[:, :, :tq]  # (B, H, Tq, D)
    return out.to(q.dtype)


def band_usable(q: torch.Tensor, tk: int, window: int | None) -> bool:
    """cuDNN band split: CUDA, fp16/bf16, head dim a multiple of 8 up to 128, forward only, a shape it takes."""
    return (
        _half_on_cuda(q, max_head_dim=128)
        and not (torch.is_grad_enabled() and q.requires_grad)
        and band_split_ok(q.shape[2], tk, window)
        and torch.backends.cuda.cudnn_sdp_enabled()
    )


def flash_usable(q: torch.Tensor) -> bool:
    return FLASH_ATTN_AVAILABLE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def fa2_usable(q: torch.Tensor) -> bool:
    return (
        _half_on_cuda(q, max_head_dim=256)
        and torch.cuda.get_device_capability(q.device)[0] >= 8
        and fa2_supported()
    )


def flex_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def auto_backend(q: torch.Tensor, tk: int, window: int | None) -> str:
    """Which kernel ``backend="auto"`` runs. flash-attn when installed; SDPA's fused causal kernels when the window
    covers every key; otherwise (the window cuts keys off) ``LONG_BACKEND`` for inputs of ``FLEX_MIN_QUERIES``
    queries or more and ``CHUNK_BACKEND`` below that, each when usable. Flex below ``FLEX_MIN_QUERIES`` only for
    chunk-shaped calls (Tq < window, padded to one key length): it compiles one kernel per (Tq, Tk) (10-30 s
    each), so prompts of varying length (an eval, a server) never take it; they fall back to fa2 or SDPA's
    query-blocked band path.
    """
    if flash_usable(q):
        return "flash"
    tq = q.shape[2]
    if _window_covers_all(tq, tk, window):
        return "sdpa"
    assert window is not None
    long = tq >= FLEX_MIN_QUERIES
    flex_ok = flex_usable(q) and (long or tq < window)
    usable = {"fa2": fa2_usable(q), "flex": flex_ok, "band": long and band_usable(q, tk, window)}
    first = LONG_BACKEND if long else CHUNK_BACKEND
    if first == "triton":  # asked only when chosen: the first call imports triton
        usable["triton"] = triton_usable(q)
    for name in (first, "fa2", "flex"):
        if usable.get(name):
            return name
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    backend: str = "auto",
    key_pad: int = 0,
) -> torch.Tensor:
    """Causal sliding-window attention. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) -> (B, H, Tq, D).

    The first ``key_pad`` keys are padding (never visible); positions count from key 0 all the same.
    """
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, (
        f"need 4-d q/k/v, got {q.shape} {k.shape} {v.shape}"
    )
    assert q.shape[1] % k.shape[1] == 0, f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}"
    assert k.shape[2] >= q.shape[2], f"keys ({k.shape[2]}) must include the queries ({q.shape[2]})"
    assert 0 <= key_pad <= k.shape[2] - q.shape[2], f"key_pad {key_pad} leaves fewer keys than queries"
    if backend == "auto":
        backend = auto_backend(q, k.shape[2] - key_pad, window)
    BACKEND_CALLS[backend] += 1
    if backend == "flex":
        return _flex_attention(q, k, v, window, key_pad)
    if key_pad:  # lower-right alignment is unchanged by dropping leading keys
        k, v = k[:, :, key_pad:], v[:, :, key_pad:]
    if backend == "math":
        return _math_attention(q, k, v, window)
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, window)
    if backend == "flash":
        return _flash_attention(q, k, v, window)
    if backend == "fa2":
        return _fa2_attention(q, k.to(q.dtype), v.to(q.dtype), window)
    if backend == "band":
        assert window is not None, "the band backend needs a window"
        return _band_attention(q, k.to(q.dtype), v.to(q.dtype), window)
    if backend == "triton":
        return _triton_attention(q, k.to(q.dtype), v.to(q.dtype), window)
    if backend == "triton2":
        from ttt import triton_band2

        return triton_band2.attention2(q, k, v, window)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")


class _WindowAttention(torch.autograd.Function):
    """Attention of b new queries over a key window whose last b slots receive the new keys in place.

    The window is a view of a preallocated buffer holding the committed (already rotated) keys, so no
    ``cat((cache, new))`` copy of the whole window is made per chunk step. The kernel runs on detached aliases
    of q and the window inside its own little autograd graph; backward differentiates that graph and keeps the
    gradients of the new keys/values (the committed ones are constants, as in the official inner step).
    First order only (``meta_loss`` never comes here).
    """

    @staticmethod
    def forward(ctx, q, k, v, win, window, backend, key_lo):  # noqa: ANN001, ANN205 - autograd.Function signature
        k_win, v_win = win
        n = k.shape[2]
        k_win[:, :, -n:].copy_(k)  # (B, Hkv, n, D) into the free slots
        v_win[:, :, -n:].copy_(v)
        if backend == "auto":
            backend = auto_backend(q, k_win.shape[2], window)
        ctx.triton = backend == "triton"
        assert ctx.triton or key_lo is None, (
            f"a window that is still filling up needs the triton backend, not {backend}"
        )
        if ctx.triton:  # our kernels: the backward computes dK/dV for the n new keys only
            BACKEND_CALLS[backend] += 1
            return _WindowAttention._triton_forward(ctx, q, k_win, v_win, window, n, key_lo)
        if not any(ctx.needs_input_grad[:3]):  # nothing to differentiate: no inner graph
            return attention(q, k_win, v_win, window=window, backend=backend)
        with torch.enable_grad():
            leaves = tuple(t.detach().requires_grad_(True) for t in (q, k_win, v_win))
            out = attention(*leaves, window=window, backend=backend)  # (B, H, n, D)
        ctx.leaves, ctx.out, ctx.n = leaves, out, n
        return out.detach()

    @staticmethod
    def _triton_forward(ctx, q, k_win, v_win, window, n, key_lo):  # noqa: ANN001, ANN205
        from ttt import triton_band

        if TRITON_WINDOW_FWD == "fa2" and key_lo is None and fa2_usable(q):
            out, lse = _fa2_forward_lse(q, k_win, v_win, window)
        else:
            out, lse = triton_band.band_forward(q, k_win, v_win, window, key_lo=key_lo)
        if any(ctx.needs_input_grad[:3]):
            # attributes, not save_for_backward: the window buffers are rewritten after the step's backward
            ctx.saved = (q, k_win, v_win, out, lse, key_lo)
            ctx.window, ctx.n = window, n
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        if ctx.triton:
            from ttt import triton_band

            q, k_win, v_win, out, lse, key_lo = ctx.saved
            del ctx.saved
            start = k_win.shape[2] - ctx.n
            dq, dk, dv = triton_band.band_backward(
                q, k_win, v_win, out, lse, grad_out, ctx.window, kv_grad_from=start, key_lo=key_lo
            )
            return dq.to(q.dtype), dk.to(k_win.dtype), dv.to(v_win.dtype), None, None, None, None
        dq, dk, dv = torch.autograd.grad(ctx.out, ctx.leaves, grad_out)
        n = ctx.n
        del ctx.leaves, ctx.out
        return dq, dk[:, :, -n:], dv[:, :, -n:], None, None, None, None


def attention_in_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    *,
    window: int | None,
    backend: str = "auto",
    key_lo: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attention(q, cat(cache_k, k), cat(cache_v, v))`` without the cat: ``k_win``/``v_win`` (B, Hkv, Tk, D) hold
    the cache in their first ``Tk - Tq`` positions and receive k, v (B, Hkv, Tq, D) in their last ``Tq`` (written in
    place). Gradients flow to q, k and v; the window buffers are not differentiated. ``key_lo`` (one int32 on the
    device, triton backend only): the cache starts there, the positions before it are empty."""
    assert k_win.shape[2] >= k.shape[2] and k_win.shape[:2] == k.shape[:2], (
        f"window {tuple(k_win.shape)} cannot take keys {tuple(k.shape)}"
    )
    assert not k_win.requires_grad and not v_win.requires_grad, "window buffers must not require grad"
    return _WindowAttention.apply(
        q, k.to(k_win.dtype), v.to(v_win.dtype), (k_win, v_win), window, backend, key_lo
    )


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run on this device/dtype (used by the backend-equivalence test)."""
    out = ["math", "sdpa"]
    if torch.device(device).type == "cuda":
        out.append("flex")
        if dtype in (torch.float16, torch.bfloat16) and fa2_supported():
            out.append("fa2")
    if (
        FLASH_ATTN_AVAILABLE
        and torch.device(device).type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
    ):
        out.append("flash")
    return out
