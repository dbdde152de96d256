"""ttt/ops2.py: the twice-differentiable RMSNorm, RoPE and silu(a) * b against autograd through the eager ops and
finite differences, and meta_loss with them."""

from __future__ import annotations

import pytest
import torch

from ttt import ModelConfig, TTTModel, ops2
from ttt import model as tm
from ttt.model import _rms_norm, _rope, rope_table


def _second_order(fn, x, w, dy, u, v):  # noqa: ANN001, ANN202
    """(y, dx, dw, and the gradients of <dx, u> + <dw, v> with respect to x, w, dy)."""
    y = fn(x, w, 1e-6)
    dx, dw = torch.autograd.grad(y, (x, w), dy, create_graph=True)
    return (y, dx, dw, *torch.autograd.grad((dx * u).sum() + (dw * v).sum(), (x, w, dy)))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 16), (2, 3, 7, 80)])
def test_rms_norm2_equals_autograd_of_rms_norm_to_second_order(monkeypatch, compiled: bool, shape) -> None:  # noqa: ANN001
    """Forward, first gradients and the gradients of a weighted sum of them (the pass meta-learning takes): eager in
    float64 to 1e-12; with the three passes compiled as on CUDA (here on CPU), in fp32."""
    dt, tol = torch.float64, 1e-12
    if compiled:
        monkeypatch.setattr(ops2, "_kernel", lambda name, fn, like: tm.compiled(f"norm2{name}", fn))
        dt, tol = torch.float32, 2e-5
    g = torch.Generator().manual_seed(0)
    x, dy, u = (torch.randn(shape, dtype=dt, generator=g) for _ in range(3))
    w = torch.rand(shape[-1], dtype=dt, generator=g) + 0.5
    v = torch.randn(shape[-1], dtype=dt, generator=g)
    leaves = [t.requires_grad_(True) for t in (x, w, dy)]
    got = _second_order(ops2.rms_norm2, *leaves, u, v)
    want = _second_order(_rms_norm, *leaves, u, v)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_rms_norm2_passes_gradgradcheck() -> None:
    """Finite differences (independent of both formulas) agree with the first and the second derivatives."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(6, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: ops2.rms_norm2(x, w, 1e-6), (x, w))
    assert torch.autograd.gradgradcheck(lambda x, w: ops2.rms_norm2(x, w, 1e-6), (x, w))


def test_rms_norm2_keeps_dtypes_and_refuses_a_mismatched_weight() -> None:
    x = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    y = ops2.rms_norm2(x, w, 1e-6)
    dx, dw = torch.autograd.grad(y.float().sum(), (x, w), create_graph=True)
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    torch.testing.assert_close(y, _rms_norm(x, w, 1e-6), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="does not match"):
        ops2.rms_norm2(x, torch.ones(4), 1e-6)


def test_meta_loss_gradients_are_unchanged_with_the_second_order_ops(monkeypatch) -> None:
    """meta_loss (two TTT blocks, checkpointed and not) routes its suffix norms, rotations and SwiGLU gates through
    ``ttt.ops2`` (every pass runs) and gives the loss and every parameter gradient of the eager ops, float64."""
    calls: dict[str, int] = {}

    def counting(name, fn, like):  # noqa: ANN001, ANN202
        def run(*a):  # noqa: ANN002, ANN202
            calls[name] = calls.get(name, 0) + 1
            return fn(*a)

        return run

    monkeypatch.setattr(ops2, "_kernel", counting)
    torch.manual_seed(0)
    m = TTTModel(ModelConfig.from_name("debug", n_ttt_layers=2)).double()
    x = torch.randint(0, m.cfg.vocab_size, (2, 50))
    params = list(m.parameters())
    for checkpoint in (False, True):
        res = []
        for flag in (False, True):
            monkeypatch.setattr(tm, "SECOND_ORDER_OPS", flag)
            calls.clear()
            loss = m.meta_loss(x, checkpoint=checkpoint)
            res.append((loss, *torch.autograd.grad(loss, params)))
        assert {
            "_norm_forward",
            "_norm_backward",
            "_norm_hvp",
            "_rope",
            "_silu_mul",
            "_silu_mul_backward",
            "_silu_mul_hvp",
        } <= set(calls), calls
        for a, b in zip(*res, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _rope_eager(x, cos, sin, interleaved):  # noqa: ANN001, ANN202
    return _rope(x, cos, sin, interleaved)


def _silu_mul_eager(a, b):  # noqa: ANN001, ANN202
    return torch.nn.functional.silu(a) * b


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope2_and_silu_mul2_equal_autograd_of_the_eager_ops_to_second_order(
    monkeypatch, compiled, interleaved
) -> None:  # noqa: ANN001
    """``rope2`` and ``silu_mul2``: output, first gradients and the gradients of a weighted sum of them (with respect
    to the inputs and the incoming gradient) == autograd through the eager ops: float64 to 1e-12; compiled as on
    CUDA (here on CPU), fp32."""
    dt, tol = torch.float64, 1e-12
    if compiled:
        monkeypatch.setattr(ops2, "_kernel", lambda name, fn, like: tm.compiled(f"ops2{name}", fn))
        dt, tol = torch.float32, 2e-5
    g = torch.Generator().manual_seed(2)
    cos, sin = rope_table(5, 7, 16, 10000.0, torch.device("cpu"), dt)

    def rand(*shape):  # noqa: ANN002, ANN202
        return (torch.randn(shape, dtype=dt, generator=g) * 2).requires_grad_(True)

    cases = [
        (lambda f: lambda x: f(x, cos, sin, interleaved), (ops2.rope2, _rope_eager), [rand(2, 3, 7, 16)]),
        (lambda f: f, (ops2.silu_mul2, _silu_mul_eager), [rand(3, 7, 24), rand(3, 7, 24)]),
    ]
    for bind, fns, xs in cases:
        dy = rand(*xs[0].shape)
        cots = [torch.randn(x.shape, dtype=dt, generator=g) for x in xs]
        res = []
        for fn in fns:
            y = bind(fn)(*xs)
            firsts = torch.autograd.grad(y, xs, dy, create_graph=True)
            total = sum((f * c).sum() for f, c in zip(firsts, cots, strict=True))
            res.append((y, *firsts, *torch.autograd.grad(total, [*xs, dy], allow_unused=True)))
        for a, b in zip(*res, strict=True):
            if a is None or b is None:  # rope is linear: its first gradient does not depend on x
                assert (a is None or not a.any()) and (b is None or not b.any())
                continue
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_rope2_and_silu_mul2_pass_gradgradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradgradcheck(ops2.silu_mul2, (a, b))
    cos, sin = rope_table(0, 4, 6, 100.0, torch.device("cpu"), torch.float64)
    for inter in (True, False):
        assert torch.autograd.gradgradcheck(lambda x, inter=inter: ops2.rope2(x, cos, sin, inter), (a,))


def test_the_second_order_suffix_launches_less_than_half_the_ops(monkeypatch) -> None:
    """What ops2 is for, counted on the meta device (shapes only): a meta_loss step over TTT blocks only dispatches
    its aten ops (views aside) plus one per fused pass well under half as often as with the eager ops (measured: 2,212
    vs 5,426 on this shape, 0.41). Any of the three ops back on the eager path raises it past 0.44 (measured: RoPE
    0.49, the SwiGLU gate 0.47, the norms 0.86)."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    views = {"view", "t", "transpose", "detach", "expand", "_unsafe_view", "unsqueeze", "slice", "select", "alias",
             "permute", "squeeze", "as_strided", "split", "unbind", "reshape", "lift_fresh", "promote_types"}  # fmt: skip

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            Count.n += func._overloadpacket.__name__ not in views
            return func(*args, **(kwargs or {}))

    def one_call(name, fn, like):  # noqa: ANN001, ANN202 - a fused pass counts as one dispatch
        def run(*a):  # noqa: ANN002, ANN202
            Count.n += 1
            with _disable_current_modes():
                return fn(*a)

        return run

    monkeypatch.setattr(ops2, "_kernel", one_call)
    with torch.device("meta"):
        m = TTTModel(ModelConfig.from_name("debug", n_layers=2, n_ttt_layers=2)).train()
    x = torch.zeros(1, 65, dtype=torch.long, device="meta")
    counts = {}
    for flag in (False, True):
        monkeypatch.setattr(tm, "SECOND_ORDER_OPS", flag)
        Count.n = 0
        with Count():
            m.meta_loss(x).backward()
        counts[flag] = Count.n
    assert counts[True] <= 0.44 * counts[False], counts
