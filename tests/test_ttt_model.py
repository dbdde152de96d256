"""TTT model: presets vs the paper's table, forward vs an independent float64 reference (full causal and SWA),
attention backends vs brute force. Run: .venv/bin/python -m pytest -q tests/test_ttt_model.py"""

from __future__ import annotations

import math

import pytest
import torch
from ttt_reference import ref_logits

from ttt import ModelConfig, TTTModel
from ttt.attention import attention, available_backends


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden=40, n_ttt_layers=1,
                window=8, ttt_chunk=4, rope_theta=100.0)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def model64(cfg: ModelConfig, seed: int = 0) -> TTTModel:
    torch.manual_seed(seed)
    m = TTTModel(cfg).double()
    with torch.no_grad():  # non-trivial norm gains so that a swapped/missing norm shows up
        for name, p in m.named_parameters():
            if "norm" in name or "_post" in name or name == "ln_f.weight":
                p.add_(0.3 * torch.randn_like(p))
    return m


# (name, total params E2E (M), total FA (M), fast-weight params (M)) from ttt-e2e.md §1.1
PAPER = [("125m", 184, 183, 11.5), ("350m", 444, 440, 42.5), ("760m", 884, 876, 92.0), ("1b", 1470, 1460, 160),
         ("3b", 2900, 2870, 346)]  # fmt: skip


@pytest.mark.parametrize("name,e2e,fa,fast", PAPER)
def test_presets_match_paper_parameter_counts(name: str, e2e: float, fa: float, fast: float) -> None:
    with torch.device("meta"):
        m, f = TTTModel(ModelConfig.from_name(name)), TTTModel(ModelConfig.fa_control(name))
    n_fast = sum(p.numel() for k, p in m.named_parameters() if ".prime." in k) / 1e6
    assert math.isclose(sum(p.numel() for p in m.parameters()) / 1e6, e2e, rel_tol=0.01)
    assert math.isclose(sum(p.numel() for p in f.parameters()) / 1e6, fa, rel_tol=0.01)
    assert math.isclose(n_fast, fast, rel_tol=0.01)
    assert m.cfg.n_ttt_layers * 4 == m.cfg.n_layers and f.cfg.window is None and f.cfg.n_ttt_layers == 0


def test_config_round_trip_and_errors() -> None:
    cfg = ModelConfig.from_name("debug", ttt_lr=0.5)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.ttt_lr == 0.5
    assert (
        ModelConfig.swa_control("125m").window == 8192 and ModelConfig.swa_control("125m").mlp_hidden == 2048
    )
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_name("7b")
    with pytest.raises(ValueError, match="n_ttt_layers"):
        ModelConfig.from_name("debug", n_ttt_layers=9)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize(
    "kw",
    [
        dict(window=None, n_ttt_layers=0),  # plain causal, no TTT
        dict(window=50, n_ttt_layers=0),  # window >= T: identical to full causal
        dict(window=5),  # SWA with a prime MLP
        dict(window=1, qk_norm=False),  # attends to itself only
        dict(window=7, n_kv_heads=4, post_norm=False),
    ],
)
def test_forward_matches_reference(kw: dict) -> None:
    cfg = tiny(**kw)
    m = model64(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 19))
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    for backend in ("math", "sdpa"):
        torch.testing.assert_close(
            m(x, backend=backend).double(), ref_logits(sd, cfg, x), rtol=1e-9, atol=1e-9
        )


def test_window_ge_T_equals_full_attention_and_window_matters() -> None:
    x = torch.randint(0, 61, (1, 12))
    full = model64(tiny(window=None))(x)
    torch.testing.assert_close(model64(tiny(window=12))(x), full, rtol=0, atol=1e-12)
    assert (model64(tiny(window=11))(x) - full).abs().max() > 1e-6  # the window really cuts


def _brute(q, k, v, window):
    """Loop over queries; queries are the last Tq key positions."""
    B, H, Tq, D = q.shape
    Tk, rep = k.shape[2], H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.zeros_like(q)
    for i in range(Tq):
        p = Tk - Tq + i
        lo = 0 if window is None else max(0, p - window + 1)
        s = (q[:, :, i : i + 1] @ k[:, :, lo : p + 1].transpose(-1, -2)) / math.sqrt(D)
        out[:, :, i] = (s.softmax(-1) @ v[:, :, lo : p + 1])[:, :, 0]
    return out


@pytest.mark.parametrize(
    "tq,tk,window", [(9, 9, None), (9, 9, 4), (9, 9, 9), (4, 13, 6), (4, 13, 13), (1, 10, 3), (5, 12, 1)]
)
def test_attention_backends_match_brute_force(tq: int, tk: int, window: int | None) -> None:
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q = torch.randn(2, 4, tq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, tk, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ref = _brute(q, k, v, window)
    for backend in available_backends("cpu", torch.float64):
        torch.testing.assert_close(
            attention(q, k, v, window=window, backend=backend), ref, rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize(
    "tq,tk,window", [(12, 12, 4), (13, 13, 4), (9, 9, 2), (10, 13, 4), (10, 20, 4), (5, 14, 6), (20, 20, 19)]
)
def test_band_from_two_causal_passes_matches_brute_force(tq: int, tk: int, window: int) -> None:
    """The band split (block-causal pass + time-reversed previous-block pass, merged by log-sum-exp): every query
    block alignment, a ragged last block, w - 1 or more cached keys, GQA; the causal kernel here is float64 math."""
    from ttt.attention import _band_attention, _causal_lse_math, band_split_ok

    assert band_split_ok(tq, tk, window)
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q = torch.randn(2, 4, tq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, tk, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out = _band_attention(q, k, v, window, causal_lse=_causal_lse_math)
    torch.testing.assert_close(out, _brute(q, k, v, window), rtol=1e-10, atol=1e-10)


def test_band_split_refuses_shapes_it_cannot_take() -> None:
    from ttt.attention import band_split_ok

    assert not band_split_ok(8, 8, None) and not band_split_ok(8, 8, 8)  # nothing cut off: plain causal
    assert not band_split_ok(8, 10, 4)  # 2 cached keys, fewer than w - 1: padding would be seen
    assert not band_split_ok(8, 8, 1)  # a window of one key has no previous block to split
    assert band_split_ok(8, 11, 4) and band_split_ok(8, 8, 4)


def test_bad_tokens_are_rejected() -> None:
    m = TTTModel(tiny())
    with pytest.raises(TypeError, match="int64"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        m(torch.tensor([[1, 61]]))
    with pytest.raises(ValueError, match="T >= 1"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(
            torch.zeros(1, 1, 2, 2),
            torch.zeros(1, 1, 2, 2),
            torch.zeros(1, 1, 2, 2),
            window=None,
            backend="x",
        )


def test_sdpa_query_blocking_matches_brute_force(monkeypatch) -> None:
    import ttt.attention as A

    monkeypatch.setattr(A, "SDPA_QUERY_BLOCK", 3)
    g = torch.Generator().manual_seed(7)
    for tq, tk, window in [(11, 11, 4), (10, 15, 2), (8, 8, 1), (7, 20, 6)]:
        q = torch.randn(1, 2, tq, 4, generator=g, dtype=torch.float64)
        k, v = (torch.randn(1, 1, tk, 4, generator=g, dtype=torch.float64) for _ in range(2))
        out = attention(q, k, v, window=window, backend="sdpa")
        torch.testing.assert_close(out, _brute(q, k, v, window), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_attention_in_window_equals_cat_and_its_gradients(backend: str) -> None:
    """The in-place window (graphed chunk step) == attention over cat(cache, new), outputs and the gradients of
    q and the new k/v, in float64; the new keys/values land in the window's tail and the cache is untouched."""
    from ttt.attention import attention_in_window

    torch.manual_seed(0)
    n, b, window = 11, 4, 12
    q, k, v = (torch.randn(2, 4, b, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    q_ref, k_ref, v_ref = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    cache_k, cache_v = (torch.randn(2, 2, n, 8, dtype=torch.float64) for _ in range(2))
    k2, v2 = k[:, :2], v[:, :2]  # 2 kv heads for 4 query heads (GQA)
    k_win, v_win = (
        torch.zeros(2, 2, n + b, 8, dtype=torch.float64),
        torch.zeros(2, 2, n + b, 8, dtype=torch.float64),
    )
    k_win[:, :, :n], v_win[:, :, :n] = cache_k, cache_v
    out = attention_in_window(q, k2, v2, k_win, v_win, window=window, backend=backend)
    ref = attention(q_ref, torch.cat((cache_k, k_ref[:, :2]), 2), torch.cat((cache_v, v_ref[:, :2]), 2),
                    window=window, backend="math")  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, r in ((q, q_ref), (k, k_ref), (v, v_ref)):
        torch.testing.assert_close(a.grad, r.grad, rtol=0, atol=1e-12)
    assert k.grad[:, 2:].abs().max() == 0  # unused heads get no gradient
    torch.testing.assert_close(k_win[:, :, n:], k2.detach(), rtol=0, atol=0)
    torch.testing.assert_close(k_win[:, :, :n], cache_k, rtol=0, atol=0)
    with torch.no_grad():  # no inner graph when nothing needs gradients: same output
        out2 = attention_in_window(q, k2, v2, k_win, v_win, window=window, backend=backend)
    torch.testing.assert_close(out2, ref.detach(), rtol=0, atol=1e-12)
