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
block over its queries and the query heads sharing it: K̄, V̄). Head dims run split as in ``ttt.triton_band``
(80 = 64 + 16 columns, no padding). Semantics as ``ttt.attention``: queries are the last Tq of Tk keys.

Tests: ``tests/test_triton_band.py`` (double backward against float64 autograd of explicit attention, through
Triton's interpreter) and ``tests/test_ttt_gpu.py`` (bf16 on the GPU).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ttt import triton_band
from ttt.triton_band import LOG2E, TRITON_AVAILABLE, split_head_dim, triton

if TRITON_AVAILABLE:
    import triton.language as tl

    from ttt.triton_band import _key_range, _load_rows, _query_block, _visible
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the three kernels by head dim. Not yet timed on a GPU: chosen as
# the configs whose sm_90 builds (triton 3.6, its ptxas) spill least. Per-thread stack bytes of (_rows, _hvp_q,
# _hvp_kv), in parentheses those of (64, 64, 4, 2): D=80 (64 + 16) 16/152/96 (344/584/528; (32, 64, 8, 2) gives
# 744/7664/16); D=64 16/16/8 (240/280/168); D=96 152/184/288 (656/1448/856); D=128 104/64/112 (1920/2696/2032). ``eval.bench_attention
# --parts second --triton-sweep`` times the alternatives.
HVP_CONFIGS = {64: (64, 32, 4, 2), 80: (64, 32, 4, 2), 96: (64, 32, 8, 2), 128: (32, 64, 8, 2)}


def hvp_config(d: int) -> tuple[int, int, int, int]:
    """Launch config for head dim d: the entry of the smallest head dim in ``HVP_CONFIGS`` at least d (else the
    largest one's)."""
    fits = [k for k in HVP_CONFIGS if k >= d]
    return HVP_CONFIGS[min(fits)] if fits else HVP_CONFIGS[max(HVP_CONFIGS)]


def usable(x: torch.Tensor, head_dim: int) -> bool:
    """Whether ``meta_loss`` may run these kernels for attention over tensors on x's device with this head dim:
    Triton present, CUDA, a head dim that splits into two power-of-two parts (the dtype is the caller's test: half
    precision, or fp32 under autocast, which ``attention2`` casts)."""
    return TRITON_AVAILABLE and x.is_cuda and split_head_dim(head_dim) is not None


if TRITON_AVAILABLE:

    @triton.jit
    def _ld(base, rows, n, D0: tl.constexpr, D1: tl.constexpr):
        """Rows of a contiguous (n, D0 + D1) slice as two column tiles, [0, D0) and [D0, D0 + D1) (the second is the
        first again when D1 = 0); rows >= n read 0."""
        x0 = _load_rows(base, rows, D0 + D1, tl.arange(0, D0), n)
        if D1 > 0:
            x1 = _load_rows(base, rows, D0 + D1, D0 + tl.arange(0, D1), n)
        else:
            x1 = x0
        return x0, x1

    @triton.jit
    def _ld_keys(K, V, GK, GV, ko, kn, TK, D0: tl.constexpr, D1: tl.constexpr):
        """Key rows kn of K, V, gK, gV (each as two column tiles)."""
        k0, k1 = _ld(K + ko, kn, TK, D0, D1)
        v0, v1 = _ld(V + ko, kn, TK, D0, D1)
        gk0, gk1 = _ld(GK + ko, kn, TK, D0, D1)
        gv0, gv1 = _ld(GV + ko, kn, TK, D0, D1)
        return k0, k1, v0, v1, gk0, gk1, gv0, gv1

    @triton.jit
    def _ld_queries(Q, DO, GQ, qo, rows, TQ, D0: tl.constexpr, D1: tl.constexpr):
        """Query rows of Q, dO, gQ (each as two column tiles)."""
        q0, q1 = _ld(Q + qo, rows, TQ, D0, D1)
        do0, do1 = _ld(DO + qo, rows, TQ, D0, D1)
        gq0, gq1 = _ld(GQ + qo, rows, TQ, D0, D1)
        return q0, q1, do0, do1, gq0, gq1

    @triton.jit
    def _offsets(H, REP, TQ, TK, D: tl.constexpr, BLOCK_M: tl.constexpr):
        """A query-block program's (bh, rows, positions, query-tensor offset, key-tensor offset)."""
        bh, b, h, hk, rows, pos = _query_block(H, REP, TK - TQ, BLOCK_M)
        return bh, rows, pos, bh.to(tl.int64) * TQ * D, (b * (H // REP) + hk) * TK * D

    @triton.jit
    def _st(base, rows, n, x0, x1, D0: tl.constexpr, D1: tl.constexpr):
        """Store two column tiles into rows < n of a contiguous (n, D0 + D1) slice."""
        keep = (rows < n)[:, None]
        off = rows.to(tl.int64)[:, None] * (D0 + D1)
        tl.store(base + off + tl.arange(0, D0)[None, :], x0, mask=keep)
        if D1 > 0:
            tl.store(base + off + D0 + tl.arange(0, D1)[None, :], x1, mask=keep)

    @triton.jit
    def _zeros(M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
        z0 = tl.zeros([M, D0], dtype=tl.float32)
        if D1 > 0:
            z1 = tl.zeros([M, D1], dtype=tl.float32)
        else:
            z1 = z0
        return z0, z1

    @triton.jit
    def _abt(a0, a1, b0, b1, D1: tl.constexpr):
        """a b^T over the split head dim: (M, N) fp32."""
        r = tl.dot(a0, tl.trans(b0))
        if D1 > 0:
            r += tl.dot(a1, tl.trans(b1))
        return r

    @triton.jit
    def _acc(c0, c1, p, y0, y1, D1: tl.constexpr):
        """(c0, c1) += p y: p (M, N) cast to y's dtype, y (N, D) as two column tiles."""
        p = p.to(y0.dtype)
        c0 += tl.dot(p, y0)
        if D1 > 0:
            c1 += tl.dot(p, y1)
        return c0, c1

    @triton.jit
    def _tile(q0, q1, do0, do1, gq0, gq1, k0, k1, v0, v1, gk0, gk1, lse2, pos, kn, k_hi, window, qk_scale,
              sm_scale, D1: tl.constexpr):  # fmt: skip
        """(p, dP, G) of one (M, N) tile: probabilities (0 outside the band), dO V^T and s (gQ K^T + Q gK^T)."""
        s = _abt(q0, q1, k0, k1, D1)  # (M, N)
        p = tl.where(_visible(pos, kn, 0, k_hi, window), tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dp = _abt(do0, do1, v0, v1, D1)
        g = (_abt(gq0, gq1, k0, k1, D1) + _abt(q0, q1, gk0, gk1, D1)) * sm_scale
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
              D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """c, e (B, H, Tq) and P gV (B, H, Tq, D) fp32 of BLOCK_M queries of one (batch, head)."""
        bh, rows, pos, qo, ko = _offsets(H, REP, TQ, TK, D0 + D1, BLOCK_M)
        q0, q1, do0, do1, gq0, gq1 = _ld_queries(Q, DO, GQ, qo, rows, TQ, D0, D1)
        lse2, delta, _, _ = _row_stats(L, DELTA, L, L, bh, rows, TQ, False)
        c = tl.zeros([BLOCK_M], dtype=tl.float32)
        a = tl.zeros([BLOCK_M], dtype=tl.float32)
        pgv0, pgv1 = _zeros(BLOCK_M, D0, D1)
        lo, hi, _, _ = _key_range(TK - TQ, TQ, 0, TK, window, BLOCK_M, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            kn = start + tl.arange(0, BLOCK_N)
            k0, k1, v0, v1, gk0, gk1, gv0, gv1 = _ld_keys(K, V, GK, GV, ko, kn, TK, D0, D1)
            p, dp, g = _tile(q0, q1, do0, do1, gq0, gq1, k0, k1, v0, v1, gk0, gk1, lse2, pos, kn, TK, window,
                             qk_scale, sm_scale, D1)  # fmt: skip
            pg = p * g
            c += tl.sum(pg, 1)
            a += tl.sum(pg * dp, 1)
            pgv0, pgv1 = _acc(pgv0, pgv1, p, gv0, gv1, D1)
        b_i = tl.sum(do0.to(tl.float32) * pgv0, 1)
        if D1 > 0:
            b_i += tl.sum(do1.to(tl.float32) * pgv1, 1)
        keep = rows < TQ
        at = bh.to(tl.int64) * TQ + rows
        tl.store(C + at, c, mask=keep)
        tl.store(E + at, a - 2.0 * delta * c + b_i, mask=keep)
        _st(PGV + qo, rows, TQ, pgv0, pgv1, D0, D1)

    @triton.jit
    def _bars(p, dp, g, dogv, delta, c, e):
        """(dS, dP̄, S̄) of one tile from its p, dP, G, dO gV^T and the rows' Δ, c, e."""
        ds = p * (dp - delta[:, None])
        dpb = p * (g - c[:, None])
        pb = g * (dp - delta[:, None]) - c[:, None] * dp + dogv
        return ds, dpb, p * (pb - e[:, None])

    @triton.jit
    def _hvp_q(Q, K, V, DO, GQ, GK, GV, L, DELTA, C, E, PGV, QB, DOB, H, REP, TQ, TK, window, qk_scale, sm_scale,
               D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """Q̄ = s (dS gK + S̄ K) and dŌ = P gV + dP̄ V (B, H, Tq, D) fp32 of BLOCK_M queries of one (batch, head)."""
        bh, rows, pos, qo, ko = _offsets(H, REP, TQ, TK, D0 + D1, BLOCK_M)
        q0, q1, do0, do1, gq0, gq1 = _ld_queries(Q, DO, GQ, qo, rows, TQ, D0, D1)
        lse2, delta, c, e = _row_stats(L, DELTA, C, E, bh, rows, TQ, True)
        qb0, qb1 = _zeros(BLOCK_M, D0, D1)
        ob0, ob1 = _zeros(BLOCK_M, D0, D1)
        lo, hi, _, _ = _key_range(TK - TQ, TQ, 0, TK, window, BLOCK_M, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            kn = start + tl.arange(0, BLOCK_N)
            k0, k1, v0, v1, gk0, gk1, gv0, gv1 = _ld_keys(K, V, GK, GV, ko, kn, TK, D0, D1)
            p, dp, g = _tile(q0, q1, do0, do1, gq0, gq1, k0, k1, v0, v1, gk0, gk1, lse2, pos, kn, TK, window,
                             qk_scale, sm_scale, D1)  # fmt: skip
            ds, dpb, sb = _bars(p, dp, g, _abt(do0, do1, gv0, gv1, D1), delta, c, e)
            qb0, qb1 = _acc(qb0, qb1, ds, gk0, gk1, D1)
            qb0, qb1 = _acc(qb0, qb1, sb, k0, k1, D1)
            ob0, ob1 = _acc(ob0, ob1, dpb, v0, v1, D1)
        pg0, pg1 = _ld(PGV + qo, rows, TQ, D0, D1)
        _st(QB + qo, rows, TQ, qb0 * sm_scale, qb1 * sm_scale, D0, D1)
        _st(DOB + qo, rows, TQ, ob0 + pg0, ob1 + pg1, D0, D1)

    @triton.jit
    def _hvp_kv(Q, K, V, DO, GQ, GK, GV, L, DELTA, C, E, KB, VB, H, REP, TQ, TK, window, qk_scale, sm_scale,
                D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """K̄ = s (dS^T gQ + S̄^T Q) and V̄ = dP̄^T dO (B, Hkv, Tk, D) fp32 of BLOCK_N keys of one (batch, kv head),
        summed over the REP query heads that share it."""
        start_n, bhk = tl.program_id(0), tl.program_id(1)
        b, hk = (bhk // (H // REP)).to(tl.int64), bhk % (H // REP)
        OFFSET = TK - TQ
        kn = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ko = bhk.to(tl.int64) * TK * (D0 + D1)
        k0, k1, v0, v1, gk0, gk1, gv0, gv1 = _ld_keys(K, V, GK, GV, ko, kn, TK, D0, D1)  # (N, D0), (N, D1)
        kb0, kb1 = _zeros(BLOCK_N, D0, D1)
        vb0, vb1 = _zeros(BLOCK_N, D0, D1)
        n_first = start_n * BLOCK_N
        i_lo = tl.maximum(0, n_first - OFFSET)  # first query whose position reaches the block's first key
        i_hi = tl.minimum(TQ, tl.minimum(n_first + BLOCK_N, TK) - 1 - OFFSET + window)  # past the last one
        for r in range(REP):
            bh = b * H + hk * REP + r
            qo = bh * TQ * (D0 + D1)
            for start in range(i_lo, i_hi, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                q0, q1, do0, do1, gq0, gq1 = _ld_queries(Q, DO, GQ, qo, rows, TQ, D0, D1)
                lse2, delta, c, e = _row_stats(L, DELTA, C, E, bh, rows, TQ, True)
                p, dp, g = _tile(q0, q1, do0, do1, gq0, gq1, k0, k1, v0, v1, gk0, gk1, lse2, rows + OFFSET, kn, TK,
                                 window, qk_scale, sm_scale, D1)  # fmt: skip
                p = tl.where((rows < TQ)[:, None], p, 0.0)  # rows past Tq read zeros, and exp2(0) is not 0
                ds, dpb, sb = _bars(p, dp, g, _abt(do0, do1, gv0, gv1, D1), delta, c, e)
                kb0, kb1 = _acc(kb0, kb1, tl.trans(ds), gq0, gq1, D1)
                kb0, kb1 = _acc(kb0, kb1, tl.trans(sb), q0, q1, D1)
                vb0, vb1 = _acc(vb0, vb1, tl.trans(dpb), do0, do1, D1)
        _st(KB + ko, kn, TK, kb0 * sm_scale, kb1 * sm_scale, D0, D1)
        _st(VB + ko, kn, TK, vb0, vb1, D0, D1)


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
    d0, d1 = split_head_dim(D)  # type: ignore[misc]  # _check: it splits
    dt = q.dtype
    qc, doc, gqc = (t.to(dt).contiguous() for t in (q, grad_out, gq))  # (B, H, Tq, D)
    kc, vc, gkc, gvc = (t.to(dt).contiguous() for t in (k, v, gk, gv))  # (B, Hkv, Tk, D)
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    c, e = torch.empty_like(lse), torch.empty_like(lse)
    pgv = torch.empty(B, H, tq, D, dtype=torch.float32, device=q.device)
    qbar, dobar = torch.empty_like(pgv), torch.empty_like(pgv)
    kbar = torch.empty(B, hkv, tk, D, dtype=torch.float32, device=q.device)
    vbar = torch.empty_like(kbar)
    scale = 1.0 / math.sqrt(D)
    common = (H, H // hkv, tq, tk, window or tk + 1, scale * LOG2E, scale)
    bm, bn, warps, stages = hvp_config(D)
    meta = dict(D0=d0, D1=d1, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    ins = (qc, kc, vc, doc, gqc, gkc, gvc, lse, delta)
    _rows[(triton.cdiv(tq, bm), B * H)](*ins, c, e, pgv, *common, **meta)
    _hvp_q[(triton.cdiv(tq, bm), B * H)](*ins, c, e, pgv, qbar, dobar, *common, **meta)
    _hvp_kv[(triton.cdiv(tk, bn), B * hkv)](*ins, c, e, kbar, vbar, *common, **meta)
    return qbar, kbar, vbar, dobar


class _BandBackward(torch.autograd.Function):
    """(q, k, v, out, lse, grad_out) -> (dq, dk, dv) of band attention, differentiable once more."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, grad_out, window):  # noqa: ANN001, ANN205 - autograd.Function signature
        delta = (grad_out.float() * out.float()).sum(-1)  # (B, H, Tq): rowsum(dO * O), for both backwards
        dq, dk, dv = triton_band.band_backward(
            q, k, v, out, lse, grad_out, window, kv_grad_from=0, delta=delta
        )
        ctx.save_for_backward(q, k, v, grad_out, lse, delta)
        ctx.window = window
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gdq, gdk, gdv):  # noqa: ANN001, ANN205
        q, k, v, go, lse, delta = ctx.saved_tensors
        qb, kb, vb, gob = band_backward_backward(q, k, v, go, lse, delta, gdq, gdk, gdv, ctx.window)
        # out and lse get none: every dependence on q, k, v runs through P, recomputed from them above
        return qb.to(q.dtype), kb.to(k.dtype), vb.to(v.dtype), None, None, gob.to(go.dtype), None


class _BandAttention2(triton_band.BandAttention):
    """Band attention (``triton_band.BandAttention``'s forward) whose backward is ``_BandBackward``: twice
    differentiable."""

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205 - autograd.Function signature
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
