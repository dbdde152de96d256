"""Band attention whose backward is itself differentiable, in Triton: what ``meta_loss`` needs on the GPU.

Why (issue 4, meta-training 5.59x full attention, ``eval/results/latency-125m-train-s6.json``): the meta-objective
differentiates through each inner SGD step, so the attention of the TTT blocks is differentiated twice. Until
now that meant explicit attention (``backend="math"``): (B, H, b, k + b) fp32 scores and probabilities per TTT
block and chunk, saved and re-read by a dozen elementwise kernels in each of three passes. Here the first
backward is the fused one of ``ttt.triton_band`` and its own backward (a Hessian-vector product) is three fused
kernels that recompute the tiles of P instead of storing them.

Math (s = 1/sqrt(D), P = softmax(s Q K^T) over the band, O = P V). The first backward, given dO:
    dP = dO V^T,  Δ_i = Σ_j P_ij dP_ij (= dO_i · O_i),  dS = P ∘ (dP − Δ),
    dQ = s dS K,  dK = s dS^T Q,  dV = P^T dO.
Its backward, given the cotangents (gQ, gK, gV) of (dQ, dK, dV), with every dependence through P:
    G = s (gQ K^T + Q gK^T)                                   (the cotangent of dS)
    c_i = Σ_j P_ij G_ij,   dP̄ = P ∘ (G − c)                   (the cotangent of dP)
    P̄ = G ∘ (dP − Δ) − c dP + dO gV^T                         (the cotangent of P)
    e_i = Σ_j P_ij P̄_ij = Σ_j P_ij G_ij dP_ij − 2 Δ_i c_i + dO_i · (P gV)_i,   S̄ = P ∘ (P̄ − e)
    Q̄ = s (dS gK + S̄ K),  K̄ = s (dS^T gQ + S̄^T Q),  V̄ = dP̄^T dO,  dŌ = P gV + dP̄ V.
Kernels: ``_rows`` (per query block over its keys: c, e, P gV), ``_hvp_q`` (Q̄, dŌ) and ``_hvp_kv`` (per key
block over its queries and the query heads sharing it: K̄, V̄). Head dims are zero-padded to a power of two
(padding adds nothing to any product). Semantics as ``ttt.attention``: queries are the last Tq of Tk keys.

Tests: ``tests/test_triton_band.py`` (double backward against float64 autograd of explicit attention, through
Triton's interpreter) and ``tests/test_ttt_gpu.py`` (bf16 on the GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ttt import triton_band
from ttt.triton_band import LOG2E, TRITON_AVAILABLE, triton

if TRITON_AVAILABLE:
    import triton.language as tl

    from ttt.triton_band import _key_range, _load_rows, _query_block, _visible
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the three kernels by padded head dim. Not yet timed on a GPU: chosen
# as the configs whose sm_90 builds (triton 3.6, ptxas) spill least: per-thread stack of (_rows, _hvp_q, _hvp_kv)
# 104/120/8 bytes at D=128 against 1824/2152/1784 for (64, 64, 4, 2); 24/64/64 at D=64 against 240/152/192.
# ``eval.bench_attention --parts second --triton-sweep`` times the alternatives.
HVP_CONFIGS = {64: (64, 64, 8, 2), 128: (32, 64, 8, 2)}


def hvp_config(dp: int) -> tuple[int, int, int, int]:
    """Launch config for padded head dim dp: its entry in ``HVP_CONFIGS``, else the nearest smaller one's."""
    fits = [d for d in HVP_CONFIGS if d <= dp]
    return HVP_CONFIGS[max(fits)] if fits else HVP_CONFIGS[min(HVP_CONFIGS)]


def usable(q: torch.Tensor) -> bool:
    """Whether ``meta_loss`` may run these kernels for q: Triton present and q on CUDA (half precision, or fp32
    under autocast, which the caller casts)."""
    return TRITON_AVAILABLE and q.is_cuda


if TRITON_AVAILABLE:

    @triton.jit
    def _tile(q, do, gq, k, v, gk, lse2, pos, kn, k_hi, window, qk_scale, sm_scale):
        """(p, dP, G) of one (M, N) tile: probabilities (0 outside the band), dO V^T and s (gQ K^T + Q gK^T)."""
        s = tl.dot(q, tl.trans(k))  # (M, N)
        p = tl.where(_visible(pos, kn, 0, k_hi, window), tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        g = (tl.dot(gq, tl.trans(k)) + tl.dot(q, tl.trans(gk))) * sm_scale
        return p, dp, g

    @triton.jit
    def _row_stats(L, DELTA, C, E, bh, rows, TQ, HAS_CE: tl.constexpr):
        """Per-row log2-sum-exp, Δ and (HAS_CE) c, e of one query block; rows >= TQ get zeros."""
        keep = rows < TQ
        at = bh.to(tl.int64) * TQ + rows
        lse2 = tl.load(L + at, mask=keep, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
        delta = tl.load(DELTA + at, mask=keep, other=0.0)
        if HAS_CE:
            return lse2, delta, tl.load(C + at, mask=keep, other=0.0), tl.load(E + at, mask=keep, other=0.0)
        return lse2, delta, delta, delta

    @triton.jit
    def _rows(Q, K, V, DO, GQ, GK, GV, L, DELTA, C, E, PGV, H, REP, TQ, TK, window, qk_scale, sm_scale,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """c, e (B, H, Tq) and P gV (B, H, Tq, D) fp32 of BLOCK_M queries of one (batch, head)."""
        bh, b, h, hk, rows, pos = _query_block(H, REP, TK - TQ, BLOCK_M)
        cols = tl.arange(0, D)
        qo, ko = bh.to(tl.int64) * TQ * D, (b * (H // REP) + hk) * TK * D
        q, do, gq = (_load_rows(Q + qo, rows, D, cols, TQ), _load_rows(DO + qo, rows, D, cols, TQ),
                     _load_rows(GQ + qo, rows, D, cols, TQ))  # fmt: skip
        lse2, delta, _, _ = _row_stats(L, DELTA, L, L, bh, rows, TQ, False)
        c = tl.zeros([BLOCK_M], dtype=tl.float32)
        a = tl.zeros([BLOCK_M], dtype=tl.float32)
        pgv = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        lo, hi, _, _ = _key_range(TK - TQ, TQ, 0, TK, window, BLOCK_M, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            kn = start + tl.arange(0, BLOCK_N)
            k, v = _load_rows(K + ko, kn, D, cols, TK), _load_rows(V + ko, kn, D, cols, TK)
            gk, gv = _load_rows(GK + ko, kn, D, cols, TK), _load_rows(GV + ko, kn, D, cols, TK)
            p, dp, g = _tile(q, do, gq, k, v, gk, lse2, pos, kn, TK, window, qk_scale, sm_scale)
            pg = p * g
            c += tl.sum(pg, 1)
            a += tl.sum(pg * dp, 1)
            pgv += tl.dot(p.to(gv.dtype), gv)
        e = a - 2.0 * delta * c + tl.sum(do.to(tl.float32) * pgv, 1)
        keep = rows < TQ
        at = bh.to(tl.int64) * TQ + rows
        tl.store(C + at, c, mask=keep)
        tl.store(E + at, e, mask=keep)
        tl.store(PGV + qo + rows[:, None] * D + cols[None, :], pgv, mask=keep[:, None])

    @triton.jit
    def _bars(p, dp, g, dogv, delta, c, e):
        """(dS, dP̄, S̄) of one tile from its p, dP, G, dO gV^T and the rows' Δ, c, e."""
        ds = p * (dp - delta[:, None])
        dpb = p * (g - c[:, None])
        pb = g * (dp - delta[:, None]) - c[:, None] * dp + dogv
        return ds, dpb, p * (pb - e[:, None])

    @triton.jit
    def _hvp_q(Q, K, V, DO, GQ, GK, GV, L, DELTA, C, E, PGV, QB, DOB, H, REP, TQ, TK, window, qk_scale, sm_scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """Q̄ = s (dS gK + S̄ K) and dŌ = P gV + dP̄ V (B, H, Tq, D) fp32 of BLOCK_M queries of one (batch, head)."""
        bh, b, h, hk, rows, pos = _query_block(H, REP, TK - TQ, BLOCK_M)
        cols = tl.arange(0, D)
        qo, ko = bh.to(tl.int64) * TQ * D, (b * (H // REP) + hk) * TK * D
        q, do, gq = (_load_rows(Q + qo, rows, D, cols, TQ), _load_rows(DO + qo, rows, D, cols, TQ),
                     _load_rows(GQ + qo, rows, D, cols, TQ))  # fmt: skip
        lse2, delta, c, e = _row_stats(L, DELTA, C, E, bh, rows, TQ, True)
        qbar = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        dobar = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        lo, hi, _, _ = _key_range(TK - TQ, TQ, 0, TK, window, BLOCK_M, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            kn = start + tl.arange(0, BLOCK_N)
            k, v = _load_rows(K + ko, kn, D, cols, TK), _load_rows(V + ko, kn, D, cols, TK)
            gk, gv = _load_rows(GK + ko, kn, D, cols, TK), _load_rows(GV + ko, kn, D, cols, TK)
            p, dp, g = _tile(q, do, gq, k, v, gk, lse2, pos, kn, TK, window, qk_scale, sm_scale)
            ds, dpb, sb = _bars(p, dp, g, tl.dot(do, tl.trans(gv)), delta, c, e)
            qbar += tl.dot(ds.to(k.dtype), gk) + tl.dot(sb.to(k.dtype), k)
            dobar += tl.dot(dpb.to(v.dtype), v)
        keep = rows < TQ
        at = qo + rows[:, None] * D + cols[None, :]
        dobar += tl.load(PGV + at, mask=keep[:, None], other=0.0)
        tl.store(QB + at, qbar * sm_scale, mask=keep[:, None])
        tl.store(DOB + at, dobar, mask=keep[:, None])

    @triton.jit
    def _hvp_kv(Q, K, V, DO, GQ, GK, GV, L, DELTA, C, E, KB, VB, H, REP, TQ, TK, window, qk_scale, sm_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """K̄ = s (dS^T gQ + S̄^T Q) and V̄ = dP̄^T dO (B, Hkv, Tk, D) fp32 of BLOCK_N keys of one (batch, kv head),
        summed over the REP query heads that share it."""
        start_n, bhk = tl.program_id(0), tl.program_id(1)
        HKV = H // REP
        b, hk = (bhk // HKV).to(tl.int64), bhk % HKV
        OFFSET = TK - TQ
        kn = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, D)
        ko = bhk.to(tl.int64) * TK * D
        k, v = _load_rows(K + ko, kn, D, cols, TK), _load_rows(V + ko, kn, D, cols, TK)  # (N, D)
        gk, gv = _load_rows(GK + ko, kn, D, cols, TK), _load_rows(GV + ko, kn, D, cols, TK)
        kbar = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        vbar = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        n_first = start_n * BLOCK_N
        n_last = tl.minimum(n_first + BLOCK_N, TK) - 1
        i_lo = tl.maximum(0, n_first - OFFSET)  # first query whose position reaches the block's first key
        i_hi = tl.minimum(TQ, n_last - OFFSET + window)  # past the last query whose window holds the last key
        for r in range(REP):
            bh = b * H + hk * REP + r
            qo = bh * TQ * D
            for start in range(i_lo, i_hi, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                q, do = _load_rows(Q + qo, rows, D, cols, TQ), _load_rows(DO + qo, rows, D, cols, TQ)
                gq = _load_rows(GQ + qo, rows, D, cols, TQ)
                lse2, delta, c, e = _row_stats(L, DELTA, C, E, bh, rows, TQ, True)
                p, dp, g = _tile(q, do, gq, k, v, gk, lse2, rows + OFFSET, kn, TK, window, qk_scale, sm_scale)
                p = tl.where((rows < TQ)[:, None], p, 0.0)  # rows past Tq read zeros, and exp2(0) is not 0
                ds, dpb, sb = _bars(p, dp, g, tl.dot(do, tl.trans(gv)), delta, c, e)
                kbar += tl.dot(tl.trans(ds.to(q.dtype)), gq) + tl.dot(tl.trans(sb.to(q.dtype)), q)
                vbar += tl.dot(tl.trans(dpb.to(do.dtype)), do)
        keep = (kn < TK)[:, None]
        at = ko + kn[:, None] * D + cols[None, :]
        tl.store(KB + at, kbar * sm_scale, mask=keep)
        tl.store(VB + at, vbar, mask=keep)


def _padded(t: torch.Tensor, dp: int, dtype: torch.dtype) -> torch.Tensor:
    """t (..., D) as a contiguous (..., dp) tensor of ``dtype``, zeros in the added columns."""
    t = t.to(dtype)
    return (F.pad(t, (0, dp - t.shape[-1])) if dp > t.shape[-1] else t).contiguous()


def band_backward_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    gq: torch.Tensor,
    gk: torch.Tensor,
    gv: torch.Tensor,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``triton_band.band_backward`` (all keys): given the cotangents (gq, gk, gv) of (dq, dk,
    dv), the gradients (q̄, k̄, v̄, dō) fp32 with respect to (q, k, v, grad_out). ``lse`` (B, H, Tq) natural-log
    log-sum-exp and ``delta`` (B, H, Tq) = rowsum(grad_out * out), both from the first backward."""
    triton_band._check(q, k, v)
    B, H, tq, D = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    for name, t, like in (("grad_out", grad_out, q), ("gq", gq, q), ("gk", gk, k), ("gv", gv, v)):
        assert t.shape == like.shape, f"{name} must be {tuple(like.shape)}, got {tuple(t.shape)}"
    dp = max(16, 1 << (D - 1).bit_length())  # a power of two: tl.arange and tl.dot need one
    dt = q.dtype
    qp, dop, gqp = (_padded(t, dp, dt) for t in (q, grad_out, gq))  # (B, H, Tq, dp)
    kp, vp, gkp, gvp = (_padded(t, dp, dt) for t in (k, v, gk, gv))  # (B, Hkv, Tk, dp)
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    c, e = torch.empty_like(lse), torch.empty_like(lse)
    pgv = torch.empty(B, H, tq, dp, dtype=torch.float32, device=q.device)
    qbar, dobar = torch.empty_like(pgv), torch.empty_like(pgv)
    kbar = torch.empty(B, hkv, tk, dp, dtype=torch.float32, device=q.device)
    vbar = torch.empty_like(kbar)
    scale = 1.0 / math.sqrt(D)
    common = (H, H // hkv, tq, tk, window or tk + 1, scale * LOG2E, scale)
    bm, bn, warps, stages = hvp_config(dp)
    meta = dict(D=dp, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    ins = (qp, kp, vp, dop, gqp, gkp, gvp, lse, delta)
    _rows[(triton.cdiv(tq, bm), B * H)](*ins, c, e, pgv, *common, **meta)
    _hvp_q[(triton.cdiv(tq, bm), B * H)](*ins, c, e, pgv, qbar, dobar, *common, **meta)
    _hvp_kv[(triton.cdiv(tk, bn), B * hkv)](*ins, c, e, kbar, vbar, *common, **meta)
    return qbar[..., :D], kbar[..., :D], vbar[..., :D], dobar[..., :D]


class _BandBackward(torch.autograd.Function):
    """(q, k, v, out, lse, grad_out) -> (dq, dk, dv) of band attention, differentiable once more."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, grad_out, window):  # noqa: ANN001, ANN205 - autograd.Function signature
        go = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq, dk, dv = triton_band.band_backward(q, k, v, out, lse, go, window, kv_grad_from=0)
        delta = (go.float() * out.float()).sum(-1)  # (B, H, Tq)
        ctx.save_for_backward(q, k, v, go, lse, delta)
        ctx.window = window
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gdq, gdk, gdv):  # noqa: ANN001, ANN205
        q, k, v, go, lse, delta = ctx.saved_tensors
        qb, kb, vb, gob = band_backward_backward(q, k, v, go, lse, delta, gdq, gdk, gdv, ctx.window)
        # out and lse get none: every dependence on q, k, v runs through P, recomputed from them above
        return qb.to(q.dtype), kb.to(k.dtype), vb.to(v.dtype), None, None, gob.to(go.dtype), None


class _BandAttention2(torch.autograd.Function):
    """Band attention (``triton_band.band_forward``) whose backward is ``_BandBackward``: twice differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, window):  # noqa: ANN001, ANN205 - autograd.Function signature
        out, lse = triton_band.band_forward(q, k, v, window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _BandBackward.apply(q, k, v, out.detach(), lse, grad_out, ctx.window)
        return dq, dk, dv, None


def attention2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Band attention (B, H, Tq, D) differentiable to second order (``backend="triton2"``). Under CUDA autocast,
    fp32 inputs run in the autocast dtype (as explicit attention's matmuls would)."""
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = (t.to(dt) if t.dtype == torch.float32 else t for t in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return triton_band.band_forward(q, k, v, window)[0]
    return _BandAttention2.apply(q, k, v, window)
