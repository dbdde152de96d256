"""One-query attention over a long cache, split over the keys (flash-decoding), in Triton: the decode step's kernel.

Why (issue 4, decode): a decode step attends B * H single queries over n cached keys. SDPA's kernels give one
program per (batch, head), 32 programs for the 3b shape at batch 1 on a 132-SM H100, so a 128K full-attention cache
streamed at 1.46 TB/s (session 7: 29.5 ms per token, about twice its byte floor), and TTT-E2E's 8K window no
better. Here the keys are cut into splits of ``SPLIT`` keys, one program per (split, batch, kv head) that handles
every query head sharing that kv head (GQA reads each key once); a second kernel merges the splits' partial softmax
sums by their maxima. Both the full-attention baseline and TTT-E2E's sliding window decode use it, so the decode
comparison is between two well-fed kernels.

``valid`` (n,) bool, optional: which cache slots hold a key (full attention's static buffer, filled up to the current
position); splits read it per key. Tests: ``tests/test_triton_band.py`` (interpreter, against float64) and
``tests/test_ttt_gpu.py``.
"""

from __future__ import annotations

import math

import torch

from ttt.triton_band import TRITON_AVAILABLE, triton

if TRITON_AVAILABLE:
    import triton.language as tl

SPLIT = 512  # keys per program (128K keys x 32 heads: 8,192 programs of 164 KB each at head dim 80)
BLOCK_N = 64  # keys per inner step with one query head per kv head; fewer with more (see launch_config)


def launch_config(rep: int) -> tuple[int, int, int]:
    """(query heads padded to a power of two, keys per inner step, warps) for ``rep`` query heads per kv head.
    The (heads x keys x head dim) products stay at 64 x 128 per 4 warps: sm_90 builds (head dim 80) spill nothing
    there, against 1.5 KB per thread at 4 heads x 64 keys."""
    rep_p = triton.next_power_of_2(rep) if TRITON_AVAILABLE else rep
    block_n = max(16, BLOCK_N // rep_p)
    return rep_p, block_n, 4 if rep_p * block_n <= 64 else 8


def usable(q: torch.Tensor) -> bool:
    """Whether decode may run this kernel: Triton present, CUDA, fp16/bf16/fp32, head dim at most 256."""
    return (
        TRITON_AVAILABLE
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.shape[-1] <= 256
    )


if TRITON_AVAILABLE:

    @triton.jit
    def _split(Q, K, V, VALID, M, L, ACC, sqb, sqh, skb, skh, skt, svb, svh, svt, H, REP, N, S, scale,
               HAS_VALID: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, REP_P: tl.constexpr,
               SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        """Keys [s * SPLIT, (s + 1) * SPLIT) of one (batch, kv head) for its REP query heads: the running max M,
        sum L (B, H, S) and unnormalised output ACC (B, H, S, D), fp32."""
        s, bhk = tl.program_id(0), tl.program_id(1)
        hkv = H // REP
        b, hk = (bhk // hkv).to(tl.int64), bhk % hkv
        r = tl.arange(0, REP_P)  # query heads hk * REP + r
        cols = tl.arange(0, BLOCK_D)
        head_ok, col_ok = r < REP, cols < D
        qp = Q + b * sqb + (hk * REP + r).to(tl.int64)[:, None] * sqh + cols[None, :]
        q = tl.load(qp, mask=head_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32) * scale  # (R, BD)
        m_i = tl.full([REP_P], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([REP_P], dtype=tl.float32)
        acc = tl.zeros([REP_P, BLOCK_D], dtype=tl.float32)
        kb, vb = K + b * skb + hk * skh, V + b * svb + hk * svh
        for start in range(s * SPLIT, tl.minimum(s * SPLIT + SPLIT, N), BLOCK_N):
            kn = start + tl.arange(0, BLOCK_N)
            ok = kn < N
            if HAS_VALID:
                ok &= tl.load(VALID + kn, mask=ok, other=0) != 0
            kv_mask = ok[:, None] & col_ok[None, :]
            k = tl.load(kb + kn.to(tl.int64)[:, None] * skt + cols[None, :], mask=kv_mask, other=0.0)
            sc = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], 2)  # (R, BLOCK_N)
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            v = tl.load(vb + kn.to(tl.int64)[:, None] * svt + cols[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        row = (b * H + hk * REP + r).to(tl.int64) * S + s  # (R,) into (B, H, S)
        tl.store(M + row, m_i, mask=head_ok)
        tl.store(L + row, l_i, mask=head_ok)
        tl.store(ACC + row[:, None] * D + cols[None, :], acc, mask=head_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _merge(M, L, ACC, OUT, S, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        """out (B, H, D) of one (batch, head): the splits' partial sums weighted by exp(m_s - max_s m_s)."""
        bh = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        m_all = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):  # the overall max first
            ss = s0 + tl.arange(0, BLOCK_S)
            m_all = tl.maximum(m_all, tl.load(M + bh * S + ss, mask=ss < S, other=float("-inf")))
        m_max = tl.max(m_all, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        num = tl.zeros([BLOCK_D], dtype=tl.float32)
        den = tl.zeros([BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            w = tl.exp(tl.load(M + bh * S + ss, mask=ss < S, other=float("-inf")) - m_max)  # (BLOCK_S,)
            den += w * tl.load(L + bh * S + ss, mask=ss < S, other=0.0)
            part = tl.load(ACC + (bh * S + ss)[:, None] * D + cols[None, :],
                           mask=(ss < S)[:, None] & (cols < D)[None, :], other=0.0)  # fmt: skip
            num += tl.sum(w[:, None] * part, 0)
        total = tl.sum(den, 0)
        out = tl.where(total > 0.0, num / tl.where(total > 0.0, total, 1.0), 0.0)
        tl.store(OUT + bh * D + cols, out.to(OUT.dtype.element_ty), mask=cols < D)


def split_kv_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of q (B, H, 1, D) over k, v (B, Hkv, n, D) (slots where ``valid`` (n,) is True, or all) ->
    (B, H, 1, D) in q's dtype. Last dims must be dense; any other strides (views of a larger buffer) are fine."""
    assert TRITON_AVAILABLE, (
        "triton is not installed: it comes with CUDA builds of torch (pip install triton)"
    )
    B, H, one, D = q.shape
    hkv, n = k.shape[1], k.shape[2]
    assert one == 1, f"split_kv_attention takes one query per row, got {one}"
    assert k.shape == v.shape == (B, hkv, n, D) and H % hkv == 0, f"q {q.shape} k {k.shape} v {v.shape}"
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "last (head) dims must be dense"
    assert valid is None or (valid.shape == (n,) and valid.dtype == torch.bool), "valid must be (n,) bool"
    S = max(1, triton.cdiv(n, SPLIT))
    m = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
    rep = H // hkv
    rep_p, block_n, warps = launch_config(rep)
    _split[(S, B * hkv)](
        q, k, v, valid if valid is not None else m, m, lsum, acc, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), H, rep, n, S,
        1.0 / math.sqrt(D), HAS_VALID=valid is not None, D=D, BLOCK_D=triton.next_power_of_2(D),
        REP_P=rep_p, SPLIT=SPLIT, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    _merge[(B * H,)](m, lsum, acc, out, S, D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_S=16)
    return out
