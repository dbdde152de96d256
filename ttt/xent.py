"""Token cross-entropy whose gradient is differentiable once more, in a few fused passes (``meta_loss``'s head).

Why (issue 4, meta-training): each inner step differentiates the chunk's CE to the fast weights with
``create_graph=True`` and the meta-gradient differentiates that again. Through autograd's generic ops this keeps the
fp32 upcast and the log-softmax of every chunk's (n, V) logits (3b: 525 MB each per 1K chunk), and the second pass runs
~a dozen elementwise kernels over them. Here the forward keeps the logits as computed (bf16 under autocast) plus the
rows' log-sum-exp, and each later pass recomputes the softmax from them:

    nll_i = lse_i - z_{i, y_i}                          (forward: ``_lse_nll``)
    dz_i = g_i (p_i - e_{y_i}),  p_i = exp(z_i - lse_i)  (first backward, itself differentiable: ``_grad``)
    given u, the cotangent of dz:                        (its backward: ``_hvp``)
        z-bar_i = g_i p_i * (u_i - p_i . u_i),   g-bar_i = p_i . u_i - u_{i, y_i}

Each pass is one compiled kernel on CUDA (inside ``autograd.Function``s, so the compiled code itself is never
differentiated); on CPU the same functions run eagerly. Tests: ``tests/test_ttt_inner.py`` (float64 against
``F.cross_entropy`` through autograd, first and second order; meta_loss gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable


def _up(z: torch.Tensor) -> torch.Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _lse_nll(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse (N,), nll (N,)) in at least fp32 of logits z (N, V) against targets y (N,)."""
    zf = _up(z)
    lse = torch.logsumexp(zf, -1)
    return lse, lse - zf.gather(1, y[:, None])[:, 0]


def _p_minus_onehot(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.exp(_up(z) - lse[:, None])  # (N, V)
    cols = torch.arange(z.shape[1], device=z.device)
    return p - (cols[None, :] == y[:, None]).to(p.dtype)


def _grad(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dz = g (softmax(z) - onehot(y)) in z's dtype."""
    return (_p_minus_onehot(z, lse, y) * g[:, None].to(lse.dtype)).to(z.dtype)


def _hvp(
    z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, g: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z-bar in z's dtype, g-bar in g's dtype): the gradients of <dz, u> with respect to z and g."""
    p = torch.exp(_up(z) - lse[:, None])  # (N, V)
    uf = u.to(p.dtype)
    pu = (p * uf).sum(-1)  # (N,)
    zbar = g[:, None].to(p.dtype) * p * (uf - pu[:, None])
    gbar = pu - uf.gather(1, y[:, None])[:, 0]
    return zbar.to(z.dtype), gbar.to(g.dtype)


def _kernel(name: str, fn: Callable, like: torch.Tensor) -> Callable:
    """fn compiled for CUDA tensors that are not float64, fn itself otherwise (``ttt.model.compiled_on_cuda``)."""
    from ttt.model import compiled_on_cuda

    return compiled_on_cuda(f"xent{name}", fn, like)


class _XentGrad(torch.autograd.Function):
    """(z, lse, y, g) -> dz = g (softmax(z) - onehot(y)); its backward (z-bar, g-bar) once differentiable."""

    @staticmethod
    def forward(ctx, z, lse, y, g):  # noqa: ANN001, ANN205 - autograd.Function signature
        ctx.save_for_backward(z, lse, y, g)
        return _kernel("_grad", _grad, z)(z, lse, y, g)

    @staticmethod
    @once_differentiable
    def backward(ctx, u):  # noqa: ANN001, ANN205
        z, lse, y, g = ctx.saved_tensors
        zbar, gbar = _kernel("_hvp", _hvp, z)(z, lse, y, g, u)
        return zbar, None, None, gbar


class _Xent(torch.autograd.Function):
    """(z (N, V), y (N,)) -> nll (N,) fp32; backward through ``_XentGrad`` (differentiable once more)."""

    @staticmethod
    def forward(ctx, z, y):  # noqa: ANN001, ANN205 - autograd.Function signature
        lse, nll = _kernel("_lse_nll", _lse_nll, z)(z, y)
        ctx.save_for_backward(z, lse, y)
        return nll

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        z, lse, y = ctx.saved_tensors
        return _XentGrad.apply(z, lse, y, g), None


def token_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (B, n) (at least fp32) of logits (B, n, V) in any dtype against targets (B, n) in [0, V):
    ``F.cross_entropy`` of the upcast logits, with a gradient that can be differentiated again cheaply."""
    B, n, V = logits.shape
    assert targets.shape == (B, n), (
        f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}"
    )
    return _Xent.apply(logits.reshape(B * n, V), targets.reshape(B * n)).view(B, n)
