"""eval/flops.py against the matmuls the code runs: a dispatch-mode counter over the explicit CPU prefill."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from eval.flops import (
    MatmulFlops,
    block_params,
    committed_tokens,
    mean_keys,
    prefill_flops,
    train_matmul_flops,
)
from ttt import ModelConfig, TTTModel


def _cfg(n_ttt: int, **kw: Any) -> ModelConfig:
    base = dict(vocab_size=1024, d_model=128, n_heads=4, mlp_hidden=256, prime_hidden=192, n_layers=4,
                n_ttt_layers=n_ttt, window=64, ttt_chunk=16)  # fmt: skip
    return ModelConfig.from_name("debug", **{**base, **kw})


@pytest.mark.parametrize(("n_ttt", "T"), [(1, 64), (2, 64), (3, 100), (2, 16)])
def test_linear_and_head_terms_equal_the_matmuls_a_prefill_runs(n_ttt: int, T: int) -> None:
    """Every non-attention term (linears, head, the inner backward's linears and head) == the counted matmul FLOPs
    of ``model.prefill`` on the explicit path: the inner step computes no weight gradient but the prime's, and no
    gradient below the first TTT block's prime MLP. A formula that counts the head's weight gradient, the static
    weights' gradients or the first TTT block's attention backward (the formula before this file) fails."""
    torch.manual_seed(0)
    cfg = _cfg(n_ttt)
    model = TTTModel(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.no_grad(), MatmulFlops() as counter:
        model.prefill(x, backend="math")
    f = prefill_flops(cfg, T)
    expected = T * (f["linear"] + f["head"] + f["inner_head"] + f["inner_linear"])
    assert counter.flops["linear"] == pytest.approx(expected, rel=1e-12), (counter.flops, f)
    assert counter.flops["batched"] > T * (f["attention"] + f["inner_attention"]) * 0.99, (
        "explicit band < formula"
    )


def test_full_attention_prefill_counts_the_head_once() -> None:
    """A model without TTT blocks (the FA/SWA twins) needs the head at the last position only."""
    cfg = _cfg(0)
    f = prefill_flops(cfg, 128)
    assert f["head"] * 128 == 2 * cfg.vocab_size * cfg.d_model
    assert f["inner_head"] == f["inner_linear"] == f["inner_attention"] == 0


def test_mean_keys_and_committed_tokens_equal_brute_force() -> None:
    for T, w in [(1, 8), (7, 8), (8, 8), (9, 8), (1000, 64), (50, None)]:
        brute = sum(min(t + 1, w or T) for t in range(T)) / T
        assert mean_keys(T, w) == pytest.approx(brute, rel=1e-12)
    cfg = _cfg(1)
    for T in (1, 16, 17, 64, 65, 100):  # chunks whose final target lies inside the input
        assert committed_tokens(cfg, T) == sum(16 for s in range(0, T, 16) if s + 16 < T)


def _fa_loss(m: TTTModel, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def test_training_counts_follow_6n_for_full_attention_and_exceed_it_for_meta_learning() -> None:
    """Counted on the meta device: full-attention training is 6 FLOPs per weight per token, the tied head's three
    products included (the 6N rule, derived independently of the counter); meta-learning (``meta_loss``) counts
    more: its inner steps and their second derivatives. The CPU explicit run gives the same count as meta."""
    cfg = _cfg(0, window=None)
    p = block_params(cfg)
    for batch in (1, 2):
        got = train_matmul_flops(cfg, 64, _fa_loss, batch=batch)
        want = 6 * (cfg.n_layers * (p["attn"] + p["mlp"]) + cfg.vocab_size * cfg.d_model)
        assert got["linear"] == pytest.approx(want, rel=1e-12)
    e2e = _cfg(2)
    meta = train_matmul_flops(e2e, 64, lambda m, x: m.meta_loss(x))
    plain = 6 * (
        e2e.n_layers * (p["attn"] + p["mlp"]) + 2 * block_params(e2e)["prime"] + e2e.vocab_size * 128
    )
    assert meta["linear"] > plain, (meta, plain)
    torch.manual_seed(0)
    with MatmulFlops() as counter:  # the same step on real CPU tensors
        TTTModel(e2e).train().meta_loss(torch.randint(0, e2e.vocab_size, (1, 65))).backward()
    assert counter.flops["linear"] / 64 == pytest.approx(meta["linear"], rel=1e-12)
