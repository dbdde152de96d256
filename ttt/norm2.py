"""RMSNorm whose backward is differentiable once more, in a few fused passes (``meta_loss``'s TTT blocks).

Why (issue 4, meta-training, H100 profile of a ``125m`` step at 8K, ``eval/results/latency-125m-train-s13.json``):
the second-order suffix runs eager, and differentiating ``_rms_norm`` twice op by op is most of its 3,367 small fp32
kernels per step (49 ms of eager elementwise work against 147 ms on the device). Each TTT block has eight norms
(the pre and post norms of attention, prime MLP and MLP, and q/k), and every chunk runs them forward, backward
(the inner step) and backward again (the meta-gradient). Here each of those passes is one function of a few
reductions, compiled on CUDA; inside ``autograd.Function``s, so compiled code is never differentiated itself.

With x (rows of D), r = (mean(x^2) + eps)^(-1/2), xh = x r, weight w (D,):

    y = w xh                                                  (forward: ``_forward``)
    g = w dy,  c = mean(g xh)
    dx = r (g - xh c),  dw = sum over rows of dy xh           (backward, itself differentiable: ``_backward``)
    given u, v (the cotangents of dx, dw):                    (its backward: ``_hvp``)
        a = sum(u g),  b = sum(u xh)                          (per row)
        t = r (u - b xh / D):  dy-bar = w t + v xh,  w-bar = sum over rows of dy t
        h = v dy - r (u c + b g / D)                          (the gradient with respect to xh, r held)
        x-bar = r (h - xh mean(h xh)) - (a - b c) r^2 xh / D  (xh = x r, r = r(x))

All arithmetic in fp32 (fp64 for fp64 inputs); outputs in the inputs' dtypes, as ``ttt.model._rms_norm``.
Tests: ``tests/test_ttt_inner.py`` (float64: against ``_rms_norm`` through autograd, first and second order,
``gradgradcheck``; ``meta_loss`` gradients unchanged).
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


def _forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in x's dtype, r (..., 1) in fp32)."""
    xf = _up(x)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * r * _up(w)).to(x.dtype), r


def _backward(
    x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dw in w's dtype)."""
    xh = _up(x) * r
    dyf = _up(dy)
    g = _up(w) * dyf
    c = (g * xh).mean(-1, keepdim=True)
    return (r * (g - xh * c)).to(x.dtype), _rows_sum(dyf * xh, w)


def _hvp(
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
    """fn compiled (dynamic shapes) for CUDA tensors that are not float64; fn itself otherwise."""
    if like.is_cuda and like.dtype != torch.float64:
        from ttt.model import compiled

        return compiled(f"norm2{name}", fn)
    return fn


class _NormGrad(torch.autograd.Function):
    """(x, w, r, dy) -> (dx, dw); its backward (x-bar, w-bar, dy-bar) once differentiable (r's dependence on x
    is in the formulas, so r itself gets no gradient)."""

    @staticmethod
    def forward(ctx, x, w, r, dy):  # noqa: ANN001, ANN205 - autograd.Function signature
        ctx.save_for_backward(x, w, r, dy)
        return _kernel("_backward", _backward, x)(x, w, r, dy)

    @staticmethod
    @once_differentiable
    def backward(ctx, u, v):  # noqa: ANN001, ANN205
        x, w, r, dy = ctx.saved_tensors
        if u is None:
            u = torch.zeros_like(x)
        if v is None:
            v = torch.zeros_like(w)
        x_bar, w_bar, dy_bar = _kernel("_hvp", _hvp, x)(x, w, r, dy, u, v)
        return x_bar, w_bar, None, dy_bar


class _Norm(torch.autograd.Function):
    """(x, w) -> RMSNorm(x) w; backward through ``_NormGrad`` (differentiable once more)."""

    @staticmethod
    def forward(ctx, x, w, eps):  # noqa: ANN001, ANN205 - autograd.Function signature
        y, r = _kernel("_forward", _forward, x)(x, w, eps)
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
