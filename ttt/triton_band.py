"""Sliding-window (band) attention in Triton: forward, and a backward that skips what TTT never uses.

Why (issue 4, H100 profile of the 3b 128K prefill, ``eval/results/latency-3b-h100-s7.json``):
- A TTT chunk step attends b = 1,024 new queries over the ``window - 1`` committed keys plus its own b keys. The
  committed keys are constants of the inner step, yet FlashAttention-2's backward computes dK and dV for all
  9,215 keys and we dropped 8,191 of them (16% of prefill time in that kernel). Here the backward is two kernels:
  dQ over every visible key, and dK/dV over the b new keys only.
- Head dim 80 (the 3b shape): FlexAttention pads it to 128 and FA-2 to 96. These kernels split it into a
  power-of-two part and a tail (80 = 64 + 16) and run exactly 80 columns.

Semantics are those of ``ttt.attention``: queries are the last ``Tq`` of ``Tk`` positions (query i sits at
``offset + i``, ``offset = Tk - Tq``); key j is visible iff ``j <= pos`` and ``pos - j < window``. Scores are
scaled by 1/sqrt(D); the log-sum-exp is the natural log of the row's sum of exp(scaled scores), FlashAttention's
convention, so either forward feeds these backward kernels. Every kernel also takes a key range ``[k_lo, k_hi)``
(keys outside it are treated as invisible); forward and dQ can read the lower bound from a device scalar
(``key_lo``), so one CUDA graph serves a cache that is still filling up.

Measured (H100, 3b shape, ``eval/results/attention-kernels-triton-s11.json``): a 128K prefix layer 27.6 ms vs Flex
37.7; a chunk step's attention (forward + gradients of q and the new keys) 0.93 ms vs FA-2 1.65; errors against fp32
the same as FA-2's (0.23%). The 128K prefill: 0.0331 s per 1K tokens vs 0.0418 before (``latency-3b-h100-s11.json``).

Tests: against float64 math on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, ``tests/test_triton_band.py``)
and in bf16 on the GPU (``tests/test_ttt_gpu.py``).
"""

from __future__ import annotations

import math
import os

import torch

try:  # optional: comes with CUDA builds of torch; CPU tests use the interpreter (TRITON_INTERPRET=1)
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except Exception:  # pragma: no cover - CPU wheels of torch ship without triton
    triton = None
    tl = None
    TRITON_AVAILABLE = False

LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel. H100, 3b shape, ``eval.bench_attention --triton-sweep``
# (eval/results/attention-kernels-triton-s11.json): forward on the 128K prefix 27.3 ms at (128, 64, 4, 3) vs 30.4-32.2
# for (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4); a chunk step's attention 0.90 ms with dQ at
# (64, 64, 4, 3) vs 1.02-1.13 for (128, 64, 8, 3), (64, 128, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4). dK/dV untuned.
FWD_CONFIG = (128, 64, 4, 3)
# the forward of calls with at most CHUNK_QUERIES queries (a TTT chunk: 1,024 queries x 32 heads = 256 programs of
# 128 rows, under two waves on 132 SMs). Same as FWD_CONFIG until timed: ``--triton-sweep`` times the alternatives.
CHUNK_FWD_CONFIG = (128, 64, 4, 3)
CHUNK_QUERIES = 4096
DQ_CONFIG = (64, 64, 4, 3)
DKDV_CONFIG = (64, 64, 4, 2)


def split_head_dim(d: int) -> tuple[int, int] | None:
    """Head dim as (a power of two >= 16, a tail that is 0 or a power of two >= 16), or None: 80 -> (64, 16)."""
    if d < 16:
        return None
    d0 = 1 << (d.bit_length() - 1)
    d1 = d - d0
    if d1 == 0 or (d1 >= 16 and d1 & (d1 - 1) == 0):
        return d0, d1
    return None


def usable(q: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` may pick these kernels for q: Triton present, CUDA half precision, a head dim that
    splits into two power-of-two parts. (Asked for by name, they also run on CPU under ``TRITON_INTERPRET=1``, the
    tests' float64 check; auto never sends CPU work to the interpreter.)"""
    if not TRITON_AVAILABLE or split_head_dim(q.shape[-1]) is None:
        return False
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


if TRITON_AVAILABLE:

    @triton.jit
    def _visible(pos, kn, k_lo, k_hi, window):
        """(M, N) mask: key kn visible from query position pos."""
        return (kn[None, :] <= pos[:, None]) & (pos[:, None] - kn[None, :] < window) & (
            kn[None, :] >= k_lo) & (kn[None, :] < k_hi)  # fmt: skip

    @triton.jit
    def _load_rows(base, rows, stride, cols, n_rows):
        """(len(rows), len(cols)) tile of a (T, D) slice with row stride ``stride``; rows >= n_rows read 0.
        64-bit offsets: a 1M-token prefix at 2,560 columns passes 2**31 elements."""
        off = rows.to(tl.int64)[:, None] * stride + cols[None, :]
        return tl.load(base + off, mask=rows[:, None] < n_rows, other=0.0)

    @triton.jit
    def _segments(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
        """Split [lo, hi) into a masked head [lo, s2), an unmasked middle [s2, s3) of whole blocks inside
        [full_lo, full_hi), and a masked tail [s3, hi)."""
        it1 = tl.cdiv(tl.maximum(tl.minimum(full_lo, hi) - lo, 0), BLOCK)
        s2 = lo + it1 * BLOCK
        it2 = tl.maximum(full_hi - s2, 0) // BLOCK
        return s2, s2 + it2 * BLOCK

    @triton.jit
    def _query_block(H, REP, OFFSET, BLOCK_M: tl.constexpr):
        """Where a query-block program (forward, dQ) works: (bh, batch as int64, head, kv head, its rows, their key
        positions)."""
        start_m, bh = tl.program_id(0), tl.program_id(1)
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        h = bh % H
        return bh, (bh // H).to(tl.int64), h, h // REP, rows, rows + OFFSET

    @triton.jit
    def _key_range(OFFSET, TQ, k_lo, k_hi, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Keys this program's block of queries reaches, [lo, hi), with its masked head [lo, s2) and unmasked
        middle [s2, s3)."""
        start_m = tl.program_id(0)
        p_first = OFFSET + start_m * BLOCK_M
        p_last = OFFSET + tl.minimum(start_m * BLOCK_M + BLOCK_M, TQ) - 1
        lo = tl.maximum(k_lo, p_first - window + 1)
        hi = tl.minimum(k_hi, p_last + 1)
        s2, s3 = _segments(lo, hi, tl.maximum(lo, p_last - window + 1), tl.minimum(hi, p_first + 1), BLOCK_N)
        return lo, hi, s2, s3

    @triton.jit
    def _fwd_step(acc0, acc1, l_i, m_i, q0, q1, kb, vb, skt, svt, pos, start, k_lo, k_hi, window, qk_scale,
                  D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
        kn = start + tl.arange(0, BLOCK_N)
        c0 = tl.arange(0, D0)
        k0 = _load_rows(kb, kn, skt, c0, k_hi)  # (N, D0)
        s = tl.dot(q0, tl.trans(k0))  # (M, N)
        if D1 > 0:
            c1 = D0 + tl.arange(0, D1)
            s += tl.dot(q1, tl.trans(_load_rows(kb, kn, skt, c1, k_hi)))
        s = s * qk_scale  # log2 units
        if MASK:
            s = tl.where(_visible(pos, kn, k_lo, k_hi, window), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_rows(vb, kn, svt, c0, k_hi)
        p = p.to(v0.dtype)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, v0)
        if D1 > 0:
            acc1 = acc1 * alpha[:, None] + tl.dot(p, _load_rows(vb, kn, svt, c1, k_hi))
        return acc0, acc1, l_i, m_new

    @triton.jit
    def _band_fwd(Q, K, V, OUT, L, KLO, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                  H, REP, TQ, OFFSET, k_lo, k_hi, window, qk_scale, KLO_PTR: tl.constexpr,
                  D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """One program: BLOCK_M queries of one (batch, head) over the keys their band reaches (keys from
        max(k_lo, *KLO) when KLO_PTR: a bound that lives on the device, so a CUDA graph can change it)."""
        if KLO_PTR:
            k_lo = tl.maximum(k_lo, tl.load(KLO))
        bh, b, h, hk, rows, pos = _query_block(H, REP, OFFSET, BLOCK_M)
        c0 = tl.arange(0, D0)
        qb = Q + b * sqb + h * sqh
        kb = K + b * skb + hk * skh
        vb = V + b * svb + hk * svh
        q0 = _load_rows(qb, rows, sqt, c0, TQ)  # (M, D0)
        acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        if D1 > 0:
            c1 = D0 + tl.arange(0, D1)
            q1 = _load_rows(qb, rows, sqt, c1, TQ)
            acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        else:
            q1, acc1 = q0, acc0  # unused
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        lo, hi, s2, s3 = _key_range(OFFSET, TQ, k_lo, k_hi, window, BLOCK_M, BLOCK_N)
        for start in range(lo, s2, BLOCK_N):
            acc0, acc1, l_i, m_i = _fwd_step(acc0, acc1, l_i, m_i, q0, q1, kb, vb, skt, svt, pos, start, k_lo,
                                             k_hi, window, qk_scale, D0, D1, BLOCK_N, True)  # fmt: skip
        for start in range(s2, s3, BLOCK_N):
            acc0, acc1, l_i, m_i = _fwd_step(acc0, acc1, l_i, m_i, q0, q1, kb, vb, skt, svt, pos, start, k_lo,
                                             k_hi, window, qk_scale, D0, D1, BLOCK_N, False)  # fmt: skip
        for start in range(s3, hi, BLOCK_N):
            acc0, acc1, l_i, m_i = _fwd_step(acc0, acc1, l_i, m_i, q0, q1, kb, vb, skt, svt, pos, start, k_lo,
                                             k_hi, window, qk_scale, D0, D1, BLOCK_N, True)  # fmt: skip
        seen = l_i > 0.0
        inv = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
        lse = tl.where(
            seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf")
        )
        ob = OUT + b * sob + h * soh
        keep = rows[:, None] < TQ
        r64 = rows.to(tl.int64)[:, None] * sot
        tl.store(ob + r64 + c0[None, :], (acc0 * inv[:, None]).to(OUT.dtype.element_ty), mask=keep)
        if D1 > 0:
            tl.store(ob + r64 + c1[None, :], (acc1 * inv[:, None]).to(OUT.dtype.element_ty), mask=keep)
        tl.store(L + bh.to(tl.int64) * TQ + rows, lse, mask=rows < TQ)

    @triton.jit
    def _dq_step(dq0, dq1, q0, q1, do0, do1, lse2, delta, kb, vb, skt, svt, pos, start, k_lo, k_hi, window,
                 qk_scale, D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
        kn = start + tl.arange(0, BLOCK_N)
        c0 = tl.arange(0, D0)
        k0 = _load_rows(kb, kn, skt, c0, k_hi)  # (N, D0)
        v0 = _load_rows(vb, kn, svt, c0, k_hi)
        s = tl.dot(q0, tl.trans(k0))  # (M, N)
        dp = tl.dot(do0, tl.trans(v0))
        if D1 > 0:
            c1 = D0 + tl.arange(0, D1)
            k1 = _load_rows(kb, kn, skt, c1, k_hi)
            s += tl.dot(q1, tl.trans(k1))
            dp += tl.dot(do1, tl.trans(_load_rows(vb, kn, svt, c1, k_hi)))
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(_visible(pos, kn, k_lo, k_hi, window), p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 += tl.dot(ds, k0)
        if D1 > 0:
            dq1 += tl.dot(ds, k1)
        return dq0, dq1

    @triton.jit
    def _band_dq(Q, K, V, DO, L, DELTA, DQ, KLO, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                 H, REP, TQ, OFFSET, k_lo, k_hi, window, qk_scale, sm_scale, KLO_PTR: tl.constexpr,
                 D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """dQ of BLOCK_M queries of one (batch, head): sum over visible keys of dS K (dQ is (B, H, Tq, D) fp32,
        contiguous; dO has its own strides sd*). Keys from max(k_lo, *KLO) when KLO_PTR."""
        if KLO_PTR:
            k_lo = tl.maximum(k_lo, tl.load(KLO))
        bh, b, h, hk, rows, pos = _query_block(H, REP, OFFSET, BLOCK_M)
        c0 = tl.arange(0, D0)
        qb, dob = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
        kb, vb = K + b * skb + hk * skh, V + b * svb + hk * svh
        q0, do0 = _load_rows(qb, rows, sqt, c0, TQ), _load_rows(dob, rows, sdt, c0, TQ)
        dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        if D1 > 0:
            c1 = D0 + tl.arange(0, D1)
            q1, do1 = _load_rows(qb, rows, sqt, c1, TQ), _load_rows(dob, rows, sdt, c1, TQ)
            dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        else:
            q1, do1, dq1 = q0, do0, dq0  # unused
        keep = rows < TQ
        lse2 = tl.load(L + bh * TQ + rows, mask=keep, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # rows that see nothing: their p is masked anyway
        delta = tl.load(DELTA + bh * TQ + rows, mask=keep, other=0.0)
        lo, hi, s2, s3 = _key_range(OFFSET, TQ, k_lo, k_hi, window, BLOCK_M, BLOCK_N)
        for start in range(lo, s2, BLOCK_N):
            dq0, dq1 = _dq_step(dq0, dq1, q0, q1, do0, do1, lse2, delta, kb, vb, skt, svt, pos, start, k_lo, k_hi,
                                window, qk_scale, D0, D1, BLOCK_N, True)  # fmt: skip
        for start in range(s2, s3, BLOCK_N):
            dq0, dq1 = _dq_step(dq0, dq1, q0, q1, do0, do1, lse2, delta, kb, vb, skt, svt, pos, start, k_lo, k_hi,
                                window, qk_scale, D0, D1, BLOCK_N, False)  # fmt: skip
        for start in range(s3, hi, BLOCK_N):
            dq0, dq1 = _dq_step(dq0, dq1, q0, q1, do0, do1, lse2, delta, kb, vb, skt, svt, pos, start, k_lo, k_hi,
                                window, qk_scale, D0, D1, BLOCK_N, True)  # fmt: skip
        D: tl.constexpr = D0 + D1
        out = DQ + bh * TQ * D + rows[:, None] * D
        tl.store(out + c0[None, :], dq0 * sm_scale, mask=keep[:, None])
        if D1 > 0:
            tl.store(out + c1[None, :], dq1 * sm_scale, mask=keep[:, None])

    @triton.jit
    def _band_dkdv(Q, K, V, DO, L, DELTA, DK, DV, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                   H, REP, TQ, OFFSET, k_lo, k_hi, window, qk_scale, sm_scale,
                   D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """dK, dV of BLOCK_N keys in [k_lo, k_hi) of one (batch, kv head), summed over the REP query heads that
        share it (DK, DV: (B, Hkv, k_hi - k_lo, D) fp32, contiguous)."""
        start_n, bhk = tl.program_id(0), tl.program_id(1)
        HKV = H // REP
        b, hk = (bhk // HKV).to(tl.int64), bhk % HKV
        kn = k_lo + start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c0 = tl.arange(0, D0)
        kb, vb = K + b * skb + hk * skh, V + b * svb + hk * svh
        k0, v0 = _load_rows(kb, kn, skt, c0, k_hi), _load_rows(vb, kn, svt, c0, k_hi)  # (N, D0)
        dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
        dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
        if D1 > 0:
            c1 = D0 + tl.arange(0, D1)
            k1, v1 = _load_rows(kb, kn, skt, c1, k_hi), _load_rows(vb, kn, svt, c1, k_hi)
            dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
            dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        n_first = k_lo + start_n * BLOCK_N
        n_last = tl.minimum(n_first + BLOCK_N, k_hi) - 1
        i_lo = tl.maximum(0, n_first - OFFSET)  # first query whose position reaches the block's first key
        i_hi = tl.minimum(TQ, n_last - OFFSET + window)  # past the last query whose window holds the last key
        for g in range(REP):
            h = hk * REP + g
            qb, dob = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
            for start in range(i_lo, i_hi, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                pos = rows + OFFSET
                q0, do0 = _load_rows(qb, rows, sqt, c0, TQ), _load_rows(dob, rows, sdt, c0, TQ)  # (M, D0)
                s = tl.dot(q0, tl.trans(k0))  # (M, N)
                dp = tl.dot(do0, tl.trans(v0))
                if D1 > 0:
                    q1, do1 = _load_rows(qb, rows, sqt, c1, TQ), _load_rows(dob, rows, sdt, c1, TQ)
                    s += tl.dot(q1, tl.trans(k1))
                    dp += tl.dot(do1, tl.trans(v1))
                keep = rows < TQ
                lse2 = tl.load(L + (b * H + h) * TQ + rows, mask=keep, other=0.0) * 1.4426950408889634
                lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
                delta = tl.load(DELTA + (b * H + h) * TQ + rows, mask=keep, other=0.0)
                vis = _visible(pos, kn, k_lo, k_hi, window) & keep[:, None]
                p = tl.where(vis, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)  # (M, N)
                ds = p * (dp - delta[:, None])
                pt, dst = tl.trans(p.to(q0.dtype)), tl.trans(ds.to(q0.dtype))  # (N, M)
                dv0 += tl.dot(pt, do0)
                dk0 += tl.dot(dst, q0)
                if D1 > 0:
                    dv1 += tl.dot(pt, do1)
                    dk1 += tl.dot(dst, q1)
        D: tl.constexpr = D0 + D1
        nk = k_hi - k_lo
        local = kn - k_lo
        keep_n = (kn < k_hi)[:, None]
        off = bhk * nk * D + local[:, None] * D
        tl.store(DK + off + c0[None, :], dk0 * sm_scale, mask=keep_n)
        tl.store(DV + off + c0[None, :], dv0, mask=keep_n)
        if D1 > 0:
            tl.store(DK + off + c1[None, :], dk1 * sm_scale, mask=keep_n)
            tl.store(DV + off + c1[None, :], dv1, mask=keep_n)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    assert TRITON_AVAILABLE, (
        "triton is not installed: it comes with CUDA builds of torch (pip install triton)"
    )
    assert all(t.is_cuda for t in (q, k, v)) or os.environ.get("TRITON_INTERPRET") == "1", (
        "the triton attention backend needs CUDA tensors (on CPU only under TRITON_INTERPRET=1, for tests)"
    )
    assert q.dim() == k.dim() == v.dim() == 4, f"need (B, H, T, D) inputs, got {q.shape} {k.shape} {v.shape}"
    assert k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[-1] == q.shape[-1], (
        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together"
    )
    assert q.shape[1] % k.shape[1] == 0, f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}"
    assert k.shape[2] >= q.shape[2], f"keys ({k.shape[2]}) must include the queries ({q.shape[2]})"
    for t in (q, k, v):
        assert t.stride(-1) == 1, "the last (head) dim must be contiguous"
    split = split_head_dim(q.shape[-1])
    assert split is not None, (
        f"head dim {q.shape[-1]} is not a power of two >= 16 plus 0 or a power of two >= 16"
    )
    return split


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _key_lo(key_lo: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(pointer argument, whether the kernel reads it): a one-element int32 device tensor, or a dummy."""
    if key_lo is None:
        return like, False
    assert key_lo.numel() == 1 and key_lo.dtype == torch.int32 and key_lo.device == like.device, (
        f"key_lo must be one int32 on {like.device}, got {key_lo.dtype} {tuple(key_lo.shape)} on {key_lo.device}"
    )
    return key_lo, True


def band_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    k_range: tuple[int, int] | None = None,
    key_lo: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Tq, D) in q's dtype, lse (B, H, Tq) fp32) of band attention over keys ``k_range`` (all), from
    key ``key_lo`` on when given (a one-element int32 tensor on the device: keys before it are padding)."""
    d0, d1 = _check(q, k, v)
    B, H, tq, D = q.shape
    tk = k.shape[2]
    lo, hi = k_range or (0, tk)
    out = torch.empty(B, H, tq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, tq, dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = CHUNK_FWD_CONFIG if tq <= CHUNK_QUERIES else FWD_CONFIG
    grid = (triton.cdiv(tq, bm), B * H)
    klo, from_ptr = _key_lo(key_lo, lse)
    _band_fwd[grid](
        q, k, v, out, lse, klo, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, H // k.shape[1], tq, tk - tq, lo, hi, window or tk + 1, LOG2E / math.sqrt(D), from_ptr,
        D0=d0, D1=d1, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def band_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    window: int | None,
    kv_grad_from: int,
    key_lo: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq (B, H, Tq, D), dk, dv (B, Hkv, Tk - kv_grad_from, D)), fp32: dQ over every visible key, dK/dV only
    for keys ``kv_grad_from..Tk-1`` (the others are constants to the caller). ``out``/``lse`` from any exact
    forward (FlashAttention's log-sum-exp convention). ``key_lo`` as in ``band_forward`` (keys before it are
    padding; they must precede ``kv_grad_from``). ``delta`` (B, H, Tq) fp32: rowsum(grad_out * out) when the
    caller has it already (else computed here). grad_out may have any strides."""
    d0, d1 = _check(q, k, v)
    B, H, tq, D = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    assert 0 <= kv_grad_from <= tk, f"kv_grad_from {kv_grad_from} outside 0..{tk}"
    assert grad_out.shape == q.shape, f"grad_out must be (B, H, Tq, D) = {tuple(q.shape)}"
    assert lse.shape == (B, H, tq), f"lse must be (B, H, Tq) = {(B, H, tq)}, got {tuple(lse.shape)}"
    go = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()  # the kernels need a dense last dim
    lse = lse.float().contiguous()
    if delta is None:
        delta = (go.float() * out.float()).sum(-1)  # (B, H, Tq): rowsum(dO * O)
    delta = delta.float().contiguous()
    dq = torch.empty(B, H, tq, D, dtype=torch.float32, device=q.device)
    win, rep, scale = window or tk + 1, H // hkv, 1.0 / math.sqrt(D)
    bm, bn, warps, stages = DQ_CONFIG
    klo, from_ptr = _key_lo(key_lo, lse)
    _band_dq[(triton.cdiv(tq, bm), B * H)](
        q, k, v, go, lse, delta, dq, klo, *_strides(q), *_strides(k), *_strides(v), *_strides(go),
        H, rep, tq, tk - tq, 0, tk, win, scale * LOG2E, scale, from_ptr,
        D0=d0, D1=d1, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    nk = tk - kv_grad_from
    dk = torch.zeros(B, hkv, nk, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if nk:
        bm, bn, warps, stages = DKDV_CONFIG
        _band_dkdv[(triton.cdiv(nk, bn), B * hkv)](
            q, k, v, go, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(go),
            H, rep, tq, tk - tq, kv_grad_from, tk, win, scale * LOG2E, scale,
            D0=d0, D1=d1, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return dq, dk, dv


class BandAttention(torch.autograd.Function):
    """Band attention: forward saves (out, lse); backward gives dq, dk, dv (first order; ``ttt.triton_band2``
    subclasses it with a backward that is differentiable again)."""

    @staticmethod
    def forward(ctx, q, k, v, window):  # noqa: ANN001, ANN205 - autograd.Function signature
        out, lse = band_forward(q, k, v, window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = band_backward(q, k, v, out, lse, grad_out, ctx.window, kv_grad_from=0)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Band attention (B, H, Tq, D) with first-order autograd; the forward kernel alone when no gradient is wanted."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return BandAttention.apply(q, k, v, window)
    return band_forward(q, k, v, window)[0]
