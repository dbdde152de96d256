"""Elementwise ops whose backward is differentiable once more, each pass one fused function (``meta_loss``'s TTT
blocks): RMSNorm, RoPE and SwiGLU's silu(a) * b.

Why (issue 4, meta-training, H100 profile of a ``125m`` step at 8K, ``eval/results/latency-125m-train-s13.json``):
the second-order suffix runs eager, and differentiating its elementwise ops twice op by op is most of its 3,367 small
fp32 kernels per step (49 ms of eager elementwise work against 147 ms on the device). Every chunk runs each TTT
block's eight norms (the pre and post norms of attention, prime MLP and MLP, and q/k), the q/k rotations and two
SwiGLUs forward, backward (the inner step) and backward again (the meta-gradient). Here each of those passes is one
function of a few reductions or none, compiled on CUDA, inside ``autograd.Function``s, so compiled code is never
differentiated itself. ``ttt.model`` routes to them inside ``unfused()`` (``SECOND_ORDER_OPS``).

RMSNorm. With x (rows of D), r = (mean(x^2) + eps)^(-1/2), xh = x r, weight w (D,):

    y = w xh                                                  (forward: ``_norm_forward``)
    g = w dy,  c = mean(g xh)
    dx = r (g - xh c),  dw = sum over rows of dy xh           (backward, itself differentiable: ``_norm_backward``)
    given u, v (the cotangents of dx, dw):                    (its backward: ``_norm_hvp``)
        a = sum(u g),  b = sum(u xh)                          (per row)
        t = r (u - b xh / D):  dy-bar = w t + v xh,  w-bar = sum over rows of dy t
        h = v dy - r (u c + b g / D)                          (the gradient with respect to xh, r held)
        x-bar = r (h - xh mean(h xh)) - (a - b c) r^2 xh / D  (xh = x r, r = r(x))

RoPE is a rotation R of each pair: its backward is R^T, the rotation by the negated angle (sin -> -sin), the same
function again; so ``rope2``'s backward is ``rope2`` and every order is one kernel.

SwiGLU's gate, y = s(a) b with s(a) = a sigmoid(a):

    da = dy b s'(a),  db = dy s(a)                            (backward: ``_silu_mul_backward``)
    given p, q (the cotangents of da, db):                    (its backward: ``_silu_mul_hvp``)
        dy-bar = p b s'(a) + q s(a),  b-bar = p dy s'(a),  a-bar = dy (p b s''(a) + q s'(a))
    s'(a) = sig (1 + a (1 - sig)),  s''(a) = sig (1 - sig) (2 + a (1 - 2 sig))

All arithmetic in fp32 (fp64 for fp64 inputs); outputs in the inputs' dtypes, as the eager ops. Tests:
``tests/test_ops2.py`` (float64: against autograd through the eager ops, first and second order, ``gradgradcheck``;
compiled in fp32; ``meta_loss`` gradients unchanged).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rows_sum(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (..., D) summed over every leading dim, as like (D,) (a weight's gradient)."""
    return t.reshape(-1, t.shape[-1]).sum(0).to(like.dtype)


def _norm_forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in x's dtype, r (..., 1) in fp32)."""
    xf = _up(x)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * r * _up(w)).to(x.dtype), r


def _norm_backward(
    x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dw in w's dtype)."""
    xh = _up(x) * r
    dyf = _up(dy)
    g = _up(w) * dyf
    c = (g * xh).mean(-1, keepdim=True)
    return (r * (g - xh * c)).to(x.dtype), _rows_sum(dyf * xh, w)


def _norm_hvp(
    x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, dy: torch.Tensor, u: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x-bar, w-bar, dy-bar): the gradients of <dx, u> + <dw, v> (module docstring)."""
    D = x.shape[-1]
    xh, dyf, wf, uf, vf = _up(x) * r, _up(dy), _up(w), _up(u), _up(v)
    g = wf * dyf
    c = (g * xh).mean(-1, keepdim=True)
    a, b = (uf * g).sum(-1, keepdim=True), (uf * xh).sum(-1, keepdim=True)
    t = r * (uf - b * xh / D)
    h = vf * dyf - r * (uf * c + b * g / D)
    x_bar = r * (h - xh * (h * xh).mean(-1, keepdim=True)) - (a - b * c) * r * r * xh / D
    return x_bar.to(x.dtype), _rows_sum(dyf * t, w), (wf * t + vf * xh).to(dy.dtype)


def _kernel(name: str, fn: Callable, like: torch.Tensor) -> Callable:
    """fn compiled for CUDA tensors that are not float64, fn itself otherwise (``ttt.model.compiled_on_cuda``)."""
    from ttt.model import compiled_on_cuda

    return compiled_on_cuda(f"ops2{name}", fn, like)


class _NormGrad(torch.autograd.Function):
    """(x, w, r, dy) -> (dx, dw); its backward (x-bar, w-bar, dy-bar) once differentiable (r's dependence on x
    is in the formulas, so r itself gets no gradient)."""

    @staticmethod
    def forward(ctx, x, w, r, dy):  # noqa: ANN001, ANN205 - autograd.Function signature
        ctx.save_for_backward(x, w, r, dy)
        return _kernel("_norm_backward", _norm_backward, x)(x, w, r, dy)

    @staticmethod
    @once_differentiable
    def backward(ctx, u, v):  # noqa: ANN001, ANN205
        x, w, r, dy = ctx.saved_tensors
        if u is None:
            u = torch.zeros_like(x)
        if v is None:
            v = torch.zeros_like(w)
        x_bar, w_bar, dy_bar = _kernel("_norm_hvp", _norm_hvp, x)(x, w, r, dy, u, v)
        return x_bar, w_bar, None, dy_bar


class _Norm(torch.autograd.Function):
    """(x, w) -> RMSNorm(x) w; backward through ``_NormGrad`` (differentiable once more)."""

    @staticmethod
    def forward(ctx, x, w, eps):  # noqa: ANN001, ANN205 - autograd.Function signature
        y, r = _kernel("_norm_forward", _norm_forward, x)(x, w, eps)
        ctx.save_for_backward(x, w, r)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x, w, r = ctx.saved_tensors
        dx, dw = _NormGrad.apply(x, w, r, dy)
        return dx, dw, None


def rms_norm2(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``ttt.model._rms_norm(x, weight, eps)`` (x (..., D), weight (D,)) with a backward that is cheap to
    differentiate again."""
    assert weight.shape == x.shape[-1:], f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}"
    return _Norm.apply(x, weight, eps)


# ---- RoPE ----------------------------------------------------------------------------------------------------------
def _rope_signed(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, sign: float
) -> torch.Tensor:
    from ttt.model import _rope

    return _rope(x, cos, sin * sign, interleaved)


class _Rope(torch.autograd.Function):
    """x -> R x (``ttt.model._rope``; sign -1: R^T); backward: the other one, through this Function again."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, sign):  # noqa: ANN001, ANN205 - autograd.Function signature
        ctx.save_for_backward(cos, sin)
        ctx.interleaved, ctx.sign = interleaved, sign
        return _kernel("_rope", _rope_signed, x)(x, cos, sin, interleaved, sign)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        cos, sin = ctx.saved_tensors
        return _Rope.apply(dy, cos, sin, ctx.interleaved, -ctx.sign), None, None, None, None


def rope2(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``ttt.model._rope(x, cos, sin, interleaved)`` (x (..., T, D), cos/sin (T, D/2), no gradient) with a backward
    of one kernel at every order."""
    assert not (cos.requires_grad or sin.requires_grad), "rope2 takes no gradient for its angle table"
    return _Rope.apply(x, cos, sin, interleaved, 1.0)


# ---- SwiGLU's silu(a) * b ------------------------------------------------------------------------------------------
def _silu_parts(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, s', s'') of s(a) = a sigmoid(a), in fp32."""
    af = _up(a)
    sig = torch.sigmoid(af)
    return af * sig, sig * (1 + af * (1 - sig)), sig * (1 - sig) * (2 + af * (1 - 2 * sig))


def _silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_silu_parts(a)[0] * _up(b)).to(torch.promote_types(a.dtype, b.dtype))


def _silu_mul_backward(
    a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    s, s1, _ = _silu_parts(a)
    dyf = _up(dy)
    return (dyf * _up(b) * s1).to(a.dtype), (dyf * s).to(b.dtype)


def _silu_mul_hvp(
    a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor, p: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a-bar, b-bar, dy-bar): the gradients of <da, p> + <db, q> (module docstring)."""
    s, s1, s2 = _silu_parts(a)
    bf, dyf, pf, qf = _up(b), _up(dy), _up(p), _up(q)
    a_bar = dyf * (pf * bf * s2 + qf * s1)
    return a_bar.to(a.dtype), (pf * dyf * s1).to(b.dtype), (pf * bf * s1 + qf * s).to(dy.dtype)


class _SiluMulGrad(torch.autograd.Function):
    """(a, b, dy) -> (da, db); its backward once differentiable."""

    @staticmethod
    def forward(ctx, a, b, dy):  # noqa: ANN001, ANN205 - autograd.Function signature
        ctx.save_for_backward(a, b, dy)
        return _kernel("_silu_mul_backward", _silu_mul_backward, a)(a, b, dy)

    @staticmethod
    @once_differentiable
    def backward(ctx, p, q):  # noqa: ANN001, ANN205
        a, b, dy = ctx.saved_tensors
        p = torch.zeros_like(a) if p is None else p
        q = torch.zeros_like(b) if q is None else q
        return _kernel("_silu_mul_hvp", _silu_mul_hvp, a)(a, b, dy, p, q)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):  # noqa: ANN001, ANN205 - autograd.Function signature
        ctx.save_for_backward(a, b)
        return _kernel("_silu_mul", _silu_mul, a)(a, b)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        a, b = ctx.saved_tensors
        return _SiluMulGrad.apply(a, b, dy)


def silu_mul2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b (a, b of one shape) with a backward that is cheap to differentiate again."""
    assert a.shape == b.shape, (
        f"silu_mul2 takes a and b of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
    )
    return _SiluMul.apply(a, b)
