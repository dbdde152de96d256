"""Test-time training: prefill and meta_loss vs an independent float64 reference, streaming equality,
finite-difference meta-gradients, checkpointing, state size and bad input.
Run: .venv/bin/python -m pytest -q tests/test_ttt_inner.py"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_ttt_model import model64, tiny
from ttt_reference import ref_logits, ref_ttt

from ttt import ModelConfig, TTTModel, TTTState
from ttt.inner import clip_by_global_norm


def _sd(m: TTTModel) -> dict:
    return {k: v.detach() for k, v in m.state_dict().items()}


def test_ttt_lr_zero_equals_plain_forward_and_first_chunk_is_untouched() -> None:
    cfg = tiny(ttt_lr=0.0)
    m0, m1 = model64(cfg), model64(cfg.replace(ttt_lr=1.0))
    x = torch.randint(0, cfg.vocab_size, (2, 21))
    plain = F.cross_entropy(m0(x)[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    out0, out1 = m0.prefill(x), m1.prefill(x)
    torch.testing.assert_close(out0.token_nll[:, 1:], plain, rtol=1e-10, atol=1e-10)
    assert (out0.token_nll[:, 0] == 0).all()
    b = cfg.ttt_chunk  # tokens 1..b are scored by chunk 1 (W0) with or without TTT
    torch.testing.assert_close(out1.token_nll[:, : b + 1], out0.token_nll[:, : b + 1], rtol=0, atol=1e-12)
    assert (
        out1.token_nll[:, b + 1 :] - out0.token_nll[:, b + 1 :]
    ).abs().max() > 1e-6  # TTT changes later chunks


@pytest.mark.parametrize("clip", [1e-3, 1e6])  # clip active / inactive
def test_one_inner_step_equals_hand_computed_sgd(clip: float) -> None:
    cfg = tiny(ttt_clip=clip, ttt_lr=0.7)
    m = model64(cfg)
    b, sd = cfg.ttt_chunk, _sd(m)
    x = torch.randint(0, cfg.vocab_size, (2, b + 1))  # exactly one complete chunk
    state = m.prefill(x).state
    layer = cfg.n_layers - 1
    for row in range(2):
        w0 = {
            n: sd[f"blocks.{layer}.prime.{n}.weight"].clone().requires_grad_(True) for n in ("w1", "w2", "w3")
        }
        # separate autograd reference: gradient of the chunk's mean CE through the reference model
        prime = lambda i, t, w0=w0: (w0["w1"], w0["w2"], w0["w3"])  # noqa: E731
        logits = ref_logits(sd, cfg, x[row : row + 1], prime)[0, :b]
        loss = F.cross_entropy(logits, x[row, 1:])
        grads = torch.autograd.grad(loss, list(w0.values()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, clip / norm.item())
        assert (scale < 1.0) == (clip < 1.0), "test setup: clip must be active exactly when intended"
        for (n, w), g in zip(w0.items(), grads, strict=True):
            expect = w.detach() - cfg.ttt_lr * scale * g
            torch.testing.assert_close(
                state.fast[f"blocks.{layer}.prime.{n}"][row], expect, rtol=1e-9, atol=1e-12
            )


@pytest.mark.parametrize(
    "kw", [dict(), dict(window=6, n_ttt_layers=2, ttt_clip=0.05), dict(window=None, bos_id=3)]
)
def test_prefill_matches_reference_ttt(kw: dict) -> None:
    cfg = tiny(**kw)
    m = model64(cfg, seed=1)
    x = torch.randint(0, cfg.vocab_size, (2, 15))
    x[0, 5] = 3  # a BOS target (masked out of the inner loss when bos_id=3)
    out = m.prefill(x)
    for row in range(2):
        nll, _, W = ref_ttt(_sd(m), cfg, x[row : row + 1])
        torch.testing.assert_close(out.token_nll[row], nll, rtol=1e-8, atol=1e-10)
        for (i, n), w in W[-1].items():
            torch.testing.assert_close(
                out.state.fast[f"blocks.{i}.prime.{n}"][row], w.detach(), rtol=1e-8, atol=1e-10
            )


def test_bos_targets_are_masked_in_inner_loss() -> None:
    cfg = tiny(bos_id=3)
    x = torch.randint(4, cfg.vocab_size, (1, cfg.ttt_chunk + 1))
    y = x.clone()
    y[0, 2] = 3  # only a BOS target differs
    m = model64(cfg)
    m_nomask = model64(cfg.replace(bos_id=None))
    fx, fy = m.prefill(x).state.fast, m.prefill(y).state.fast
    fz = m_nomask.prefill(y).state.fast
    key = next(iter(fx))
    assert not torch.allclose(fy[key], fz[key]), "masking must change the update"
    assert not torch.allclose(fx[key], fy[key])  # different inputs -> different update (sanity)


@pytest.mark.parametrize("splits", [[4], [5], [3, 4], [1, 1, 1], [8, 1], [12], [7, 2, 9]])
def test_streaming_prefill_equals_one_shot(splits: list[int]) -> None:
    cfg = tiny(window=6)
    m = model64(cfg, seed=2)
    x = torch.randint(0, cfg.vocab_size, (2, 22))
    full = m.prefill(x)
    nlls, state, start = [], None, 0
    for stop in [*splits, x.shape[1]]:
        stop = max(stop, start + 1) if stop > start else start + stop
        out = m.prefill(x[:, start:stop], state)
        nlls.append(out.token_nll)
        state, start = out.state, stop
        if start >= x.shape[1]:
            break
    torch.testing.assert_close(torch.cat(nlls, 1), full.token_nll, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(state.last_logits, full.last_logits, rtol=1e-9, atol=1e-11)
    for k in full.state.fast:
        torch.testing.assert_close(state.fast[k], full.state.fast[k], rtol=1e-9, atol=1e-12)
    assert state.pos == full.state.pos == x.shape[1]


def test_prefill_does_not_mutate_model_or_input_state() -> None:
    m = model64(tiny())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s1 = m.prefill(torch.randint(0, 61, (1, 9))).state
    snap = s1.clone()
    m.prefill(torch.randint(0, 61, (1, 9)), s1)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in snap.tensors().items():
        assert torch.equal(v, s1.tensors()[k]), k


def test_meta_loss_equals_reference_mean_of_chunk_losses() -> None:
    cfg = tiny(window=6, ttt_clip=0.05)
    m = model64(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 3 * cfg.ttt_chunk + 1))
    _, losses, _ = ref_ttt(_sd(m), cfg, x)
    torch.testing.assert_close(m.meta_loss(x), torch.stack(losses).mean(), rtol=1e-10, atol=1e-12)


def _fd_check(m: TTTModel, x: torch.Tensor, name: str, idx: tuple, eps: float = 1e-6) -> None:
    m.zero_grad()
    m.meta_loss(x).backward()
    p = m.get_parameter(name)
    analytic = p.grad[idx].item()
    with torch.no_grad():
        p[idx] += eps
        up = m.meta_loss(x).item()
        p[idx] -= 2 * eps
        down = m.meta_loss(x).item()
        p[idx] += eps
    fd = (up - down) / (2 * eps)
    assert abs(analytic - fd) <= 1e-6 * max(1.0, abs(fd)), f"{name}{idx}: autograd {analytic} vs FD {fd}"
    assert abs(fd) > 1e-7, f"{name}{idx}: gradient too small to test"


@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_meta_loss_gradients_match_finite_differences(clip: float) -> None:
    cfg = tiny(window=6, ttt_clip=clip, ttt_lr=3.0)
    m = model64(cfg, seed=3)
    x = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.ttt_chunk + 1))
    last = cfg.n_layers - 1
    for name, idx in [(f"blocks.{last}.prime.w1.weight", (3, 5)), (f"blocks.{last}.prime.w2.weight", (1, 2)),
                      (f"blocks.{last}.attn.wq.weight", (4, 7)), ("blocks.0.attn.wk.weight", (2, 3))]:  # fmt: skip
        _fd_check(m, x, name, idx)


def test_meta_gradient_is_second_order() -> None:
    """Dropping create_graph (first-order) changes the W0 gradient: the test above can tell them apart."""
    import ttt.inner as inner

    cfg = tiny(window=6, ttt_lr=3.0)
    m = model64(cfg, seed=3)
    x = torch.randint(0, cfg.vocab_size, (1, 3 * cfg.ttt_chunk + 1))
    name = f"blocks.{cfg.n_layers - 1}.prime.w1.weight"
    g2 = torch.autograd.grad(m.meta_loss(x), m.get_parameter(name))[0]
    orig = inner.suffix_chunk_step

    def first_order(*a, **kw):
        out = orig(*a, **kw)
        return out._replace(fast={k: v.detach() + (a[1][k] - a[1][k].detach()) for k, v in out.fast.items()})

    inner.suffix_chunk_step = first_order
    try:
        g1 = torch.autograd.grad(m.meta_loss(x), m.get_parameter(name))[0]
    finally:
        inner.suffix_chunk_step = orig
    assert (g1 - g2).abs().max() > 1e-6


def test_checkpointed_meta_loss_has_identical_gradients() -> None:
    cfg = tiny(window=6, ttt_clip=0.05)
    m = model64(cfg, seed=4)
    x = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.ttt_chunk + 3))
    params = list(m.parameters())
    l1 = m.meta_loss(x)
    g1 = torch.autograd.grad(l1, params)
    l2 = m.meta_loss(x, checkpoint=True)
    g2 = torch.autograd.grad(l2, params)
    assert l1.item() == pytest.approx(l2.item(), abs=1e-13)
    for (n, _), a, b in zip(m.named_parameters(), g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=n)


def test_ilr_scale_zero_equals_no_ttt() -> None:
    cfg = tiny()
    m = model64(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 13))
    m0 = model64(cfg.replace(ttt_lr=0.0))
    torch.testing.assert_close(m.meta_loss(x, ilr_scale=0.0), m0.meta_loss(x), rtol=0, atol=1e-12)


def test_clip_is_finite_at_zero_gradient() -> None:
    g = [torch.zeros(2, 3, requires_grad=True)]
    out = clip_by_global_norm(g, 1.0)
    (d,) = torch.autograd.grad(out[0].sum(), g)
    assert torch.isfinite(d).all() and torch.equal(d, torch.ones_like(d))


def test_sgd_step_equals_float64_formula_and_in_place_into_its_own_inputs() -> None:
    """W - lr * clip(g) per row (one row clipped, one not), against the formula in float64; the in-place
    form (the CUDA-graph step writes W_i into the very buffers W_{i-1} lives in) gives the same values."""
    from ttt.inner import sgd_step

    g0 = torch.Generator().manual_seed(0)
    fast = {n: torch.randn(2, 5, 3, generator=g0, dtype=torch.float64) for n in ("a", "b")}
    grads = [torch.randn(2, 5, 3, generator=g0, dtype=torch.float64) for _ in fast]
    grads[0][1] *= 1e-3  # row 1: norm below the clip
    grads[1][1] *= 1e-3
    clip, lr = 1.0, 0.3
    norms = torch.stack([torch.cat([g[r].flatten() for g in grads]).norm() for r in range(2)])
    assert norms[0] > clip > norms[1], norms
    scale = torch.where(norms > clip, clip / norms, torch.ones_like(norms))
    ref = {n: w - lr * scale.view(2, 1, 1) * g for (n, w), g in zip(fast.items(), grads, strict=True)}
    out = sgd_step(fast, grads, lr, clip)
    bufs = {n: w.clone() for n, w in fast.items()}
    out_in_place = sgd_step(bufs, grads, lr, clip, into=bufs)
    for n in fast:
        torch.testing.assert_close(out[n], ref[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out_in_place[n], ref[n], rtol=1e-12, atol=1e-12)
        assert out_in_place[n] is bufs[n] and not torch.equal(bufs[n], fast[n])


def test_state_size_is_independent_of_T_and_round_trips(tmp_path) -> None:
    m = TTTModel(ModelConfig.from_name("debug"))
    b = m.cfg.ttt_chunk
    sizes = []
    for T in (97, 97 + 4 * b, 97 + 12 * b):
        out = m.prefill(torch.randint(0, 512, (1, T)))
        sizes.append(out.state.nbytes())
    assert sizes[0] == sizes[1] == sizes[2]
    out.state.save(tmp_path / "s.safetensors")
    s2 = TTTState.load(tmp_path / "s.safetensors")
    for k, v in out.state.tensors().items():
        assert torch.equal(v, s2.tensors()[k]), k
    assert s2.pos == out.state.pos and s2.signature == out.state.signature
    nxt = torch.randint(0, 512, (1, 5))
    torch.testing.assert_close(
        m.prefill(nxt, s2).token_nll, m.prefill(nxt, out.state).token_nll, rtol=0, atol=0
    )


def test_state_from_another_config_or_batch_is_rejected() -> None:
    m, other = TTTModel(tiny()), TTTModel(tiny(window=7))
    s = other.prefill(torch.randint(0, 61, (1, 5))).state
    with pytest.raises(ValueError, match="another model config"):
        m.prefill(torch.randint(0, 61, (1, 5)), s)
    s = m.prefill(torch.randint(0, 61, (1, 5))).state
    with pytest.raises(ValueError, match="batch 2"):
        m.prefill(torch.randint(0, 61, (2, 5)), s)
    with pytest.raises(TypeError, match="TTTState"):
        m.prefill(torch.randint(0, 61, (1, 5)), {"fast": {}})
    with pytest.raises(ValueError, match="T >= 2"):
        m.meta_loss(torch.randint(0, 61, (1, 1)))


def test_compiled_head_nll_equals_eager_head() -> None:
    """The compiled head + NLL of prefill's GPU chunk step (only the last logits row comes out) == the eager
    head's logits and NLL, values and input gradients (compiled on CPU here; CUDA uses the same function)."""
    from ttt.inner import head_nll

    torch.manual_seed(0)
    m = TTTModel(ModelConfig.from_name("debug", vocab_size=300)).double()
    x = torch.randn(2, 16, m.cfg.d_model, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 300, (2, 16))
    last, nll = head_nll(m, x, t, fused=True)
    logits, ref = head_nll(m, x, t, fused=False)
    assert last.shape == (2, 1, 300) and logits.shape == (2, 16, 300)
    torch.testing.assert_close(last, logits[:, -1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nll, ref, rtol=1e-12, atol=1e-12)
    w = torch.rand(2, 16, dtype=torch.float64)  # a weighted loss: each position's gradient counts
    g, g_ref = (torch.autograd.grad((n * w).sum(), x)[0] for n in (nll, ref))
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_meta_loss_prefix_runs_compiled_and_gives_the_eager_gradients(monkeypatch) -> None:
    """meta_loss runs its prefix blocks with the compiled (first-order) elementwise kernels and only the suffix,
    whose inner gradients are differentiated again, eagerly: loss and every parameter gradient equal those of an
    all-eager run. Compiled on CPU here by letting ``fused_enabled`` accept CPU tensors (CUDA uses the same
    functions); a compiled suffix would fail, as compiled kernels have no double backward."""
    from ttt import model as tm
    from ttt.model import unfused

    monkeypatch.setattr(tm, "_COMPILED", {})
    monkeypatch.setattr(tm, "fused_enabled", lambda x: x.dtype != torch.float64 and not tm._FUSED_OFF.get())
    torch.manual_seed(0)
    m = TTTModel(ModelConfig.from_name("debug", n_ttt_layers=2))
    x = torch.randint(0, m.cfg.vocab_size, (2, 50))
    params = list(m.parameters())
    with unfused():
        want = m.meta_loss(x)
        g_want = torch.autograd.grad(want, params)
    assert not tm._COMPILED
    got = m.meta_loss(x)
    g_got = torch.autograd.grad(got, params)
    assert {"rms_norm", "rope"} <= set(tm._COMPILED), tm._COMPILED.keys()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (n, _), a, b in zip(m.named_parameters(), g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_fused_block_ops_give_the_separate_ops_results(monkeypatch) -> None:
    """silu(a) * b and x + post_norm(a) compiled as one kernel each (``FUSED_BLOCK_OPS``) == the separate ops:
    forward logits, a streamed prefill's NLL and state, and parameter gradients of the plain forward. Compiled
    on CPU here by letting ``fused_enabled`` accept CPU tensors (CUDA runs the same functions)."""
    from ttt import model as tm

    monkeypatch.setattr(tm, "_COMPILED", {})
    monkeypatch.setattr(tm, "fused_enabled", lambda x: x.dtype != torch.float64 and not tm._FUSED_OFF.get())
    torch.manual_seed(0)
    m = TTTModel(ModelConfig.from_name("debug", n_ttt_layers=2))
    x = torch.randint(0, m.cfg.vocab_size, (2, 50))
    res = []
    for flag in (False, True):
        monkeypatch.setattr(tm, "FUSED_BLOCK_OPS", flag)
        logits = m(x)
        grads = torch.autograd.grad(logits.square().mean(), list(m.parameters()))
        a = m.prefill(x[:, :30])
        b = m.prefill(x[:, 30:], a.state)
        res.append([logits, *grads, a.token_nll, b.token_nll, *b.state.fast.values()])
    assert {"silu_mul", "add_rms_norm"} <= set(tm._COMPILED), tm._COMPILED.keys()
    for got, want in zip(res[1], res[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_token_xent_equals_cross_entropy_to_second_order(monkeypatch, compiled: bool) -> None:
    """``ttt.xent.token_xent`` == ``F.cross_entropy`` of the upcast logits: the NLL, its gradient taken with
    create_graph, and the gradients of <that gradient, u> with respect to the logits and the NLL's weights. Eager in
    float64; with the passes compiled as on CUDA (here on CPU), in fp32."""
    from ttt import xent
    from ttt.model import compiled as compile_fn

    token_xent, dt, tol = xent.token_xent, torch.float64, 1e-12
    if compiled:
        monkeypatch.setattr(xent, "_kernel", lambda name, fn, like: compile_fn(f"xent{name}", fn))
        dt, tol = torch.float32, 1e-5
    torch.manual_seed(0)
    z = torch.randn(2, 7, 11, dtype=dt, requires_grad=True)
    y = torch.randint(0, 11, (2, 7))
    g = torch.rand(2, 7, dtype=dt, requires_grad=True)
    u = torch.randn(2, 7, 11, dtype=dt)
    res = []
    for fn in (token_xent, lambda z, y: F.cross_entropy(z.transpose(1, 2), y, reduction="none")):
        nll = fn(z, y)
        (dz,) = torch.autograd.grad((nll * g).sum(), z, create_graph=True)
        res.append((nll, dz, *torch.autograd.grad((dz * u).sum(), (z, g))))
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_meta_loss_with_fused_xent_equals_generic_cross_entropy(monkeypatch) -> None:
    """meta_loss and its parameter gradients (float64, two TTT blocks) are the same with ``META_XENT`` on and off."""
    from ttt import inner

    torch.manual_seed(0)
    m = TTTModel(ModelConfig.from_name("debug", n_ttt_layers=2)).double()
    x = torch.randint(0, m.cfg.vocab_size, (2, 50))
    res = []
    for flag in (False, True):
        monkeypatch.setattr(inner, "META_XENT", flag)
        loss = m.meta_loss(x)
        res.append((loss, *torch.autograd.grad(loss, list(m.parameters()))))
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
