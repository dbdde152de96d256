"""q/k RMSNorm and RoPE in one Triton kernel, for forward-only attention calls (the prefix pass of a prefill).

Why (issue 4, H100 profile of the 3b 128K prefill, ``eval/results/latency-3b-s11-triton-profile.json``): the
compiled RoPE kernel took 218 ms over 2,104 calls, nearly all of it in the ~72 calls on 128K-token prefix tensors:
about 3 ms each where reading and writing one (1, 32, 131072, 80) bf16 tensor takes about 0.45 ms at the H100's
bandwidth; the q/k norms before it read and write the same tensors once more. Here one pass reads x and writes
the rotated tensor (and, for keys, the normed pre-RoPE copy the cache keeps).

Same arithmetic as the eager path (``ttt.model._rms_norm`` then ``ttt.model._rope``): the norm in fp32, its
result rounded to x's dtype, then rotated in fp32 by the caller's cos/sin table (angles from float64 positions,
as ``apply_rope`` computes them) and rounded again. A rotation partner (column c ^ 1 when interleaved, c +- D/2
otherwise) is a second load of the same row, normed with the row's own scale.

Forward only: calls that need gradients keep the compiled ops (their backward is what the TTT step differentiates).
Tests: ``tests/test_triton_band.py`` (interpreter, against float64) and ``tests/test_ttt_gpu.py`` (bf16 on CUDA).
"""

from __future__ import annotations

import torch

from ttt.triton_band import TRITON_AVAILABLE, triton

if TRITON_AVAILABLE:
    import triton.language as tl

BLOCK_ROWS = 16  # (batch, head, position) rows per program


def usable(x: torch.Tensor) -> bool:
    """Whether the model may run this kernel on x: Triton present, CUDA, fp16/bf16/fp32, no gradient wanted."""
    return (
        TRITON_AVAILABLE
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


if TRITON_AVAILABLE:

    @triton.jit
    def _norm_rope(X, W, COS, SIN, OUT, NORMED, sxb, sxh, sxt, sob, soh, sot, H, T, N, eps,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, NORM: tl.constexpr,
                   INTERLEAVED: tl.constexpr, WRITE_NORMED: tl.constexpr):  # fmt: skip
        """BLOCK_R rows of x (B, H, T, D), counted in (b, t, h) order (heads fastest: consecutive rows of a
        (B, T, H, D) projection are adjacent in memory): out = rope(norm(x)) and (WRITE_NORMED) normed = norm(x),
        both with OUT's strides."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        h = rows % H
        bt = rows // H
        t, b = bt % T, (bt // T).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        HALF: tl.constexpr = D // 2
        if INTERLEAVED:  # pairs (2j, 2j + 1): out[2j] = x0 cos - x1 sin, out[2j + 1] = x1 cos + x0 sin
            partner, j, first = cols ^ 1, cols // 2, cols % 2 == 0
        else:  # halves: out[j] = x0 cos - x1 sin, out[j + D/2] = x1 cos + x0 sin
            first = cols < HALF
            partner = tl.where(first, cols + HALF, cols - HALF)
            j = tl.where(first, cols, cols - HALF)
        keep = (rows < N)[:, None] & (cols < D)[None, :]
        xrow = (b * sxb + h * sxh + t.to(tl.int64) * sxt)[:, None]
        x = tl.load(X + xrow + cols[None, :], mask=keep, other=0.0).to(tl.float32)  # (R, BLOCK_D)
        xp = tl.load(X + xrow + partner[None, :], mask=keep, other=0.0).to(tl.float32)
        orow = (b * sob + h * soh + t.to(tl.int64) * sot)[:, None]
        if NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
            w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
            wp = tl.load(W + partner, mask=cols < D, other=0.0).to(tl.float32)
            x = (x * rstd[:, None] * w[None, :]).to(OUT.dtype.element_ty)
            xp = (xp * rstd[:, None] * wp[None, :]).to(OUT.dtype.element_ty).to(tl.float32)
            if WRITE_NORMED:
                tl.store(NORMED + orow + cols[None, :], x, mask=keep)
            x = x.to(tl.float32)
        tab = t[:, None] * HALF + j[None, :]
        c = tl.load(COS + tab, mask=keep, other=0.0)
        s = tl.load(SIN + tab, mask=keep, other=0.0)
        out = tl.where(first[None, :], x * c - xp * s, x * c + xp * s)
        tl.store(OUT + orow + cols[None, :], out.to(OUT.dtype.element_ty), mask=keep)


def norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    want_normed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rope(norm(x)), norm(x) when ``want_normed`` else None) for x (B, H, T, D) with a dense last dim, as
    ``_rope(_rms_norm(x, weight, eps), cos, sin)``; ``weight`` None skips the norm (then the second output is x).
    cos/sin: (T, D/2) fp32. Outputs take x's dtype and strides."""
    assert TRITON_AVAILABLE, (
        "triton is not installed: it comes with CUDA builds of torch (pip install triton)"
    )
    assert x.dim() == 4 and x.stride(-1) == 1, (
        f"need (B, H, T, D) with a dense last dim, got {tuple(x.shape)}"
    )
    B, H, T, D = x.shape
    assert D % 2 == 0, f"RoPE needs an even head dim, got {D}"
    for name, tab in (("cos", cos), ("sin", sin)):
        assert tab.shape == (T, D // 2) and tab.dtype == torch.float32, (
            f"{name} must be (T, D/2) = {(T, D // 2)} fp32, got {tuple(tab.shape)} {tab.dtype}"
        )
    out = torch.empty_like(x)  # x's strides: a (B, T, H, D) projection viewed as (B, H, T, D) stays that way
    normed = torch.empty_like(x) if want_normed and weight is not None else None
    n = B * H * T
    norm = weight is not None
    _norm_rope[(triton.cdiv(n, BLOCK_ROWS),)](
        x, weight if norm else cos, cos.contiguous(), sin.contiguous(), out, normed if normed is not None else out,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), H, T, n, eps,
        D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_R=BLOCK_ROWS, NORM=norm, INTERLEAVED=interleaved,
        WRITE_NORMED=normed is not None,
    )  # fmt: skip
    if want_normed and not norm:
        return out, x
    return out, normed
