"""DecodeSession (ring-buffer caches, dedicated per-token step) == feeding each token through prefill.

Checked in float64 so any semantic difference (a wrong ring slot, a stale fast weight, a missed or early TTT
step, a wrong RoPE position or snapshot) shows as an error far above rounding: chunk steps, ring wrap-around,
a prompt that ends exactly on a chunk boundary, batch 2, full attention and the plain SWA model.
"""

from __future__ import annotations

import pytest
import torch

from ttt import ModelConfig, TTTModel
from ttt.decode import DecodeSession, rope_cos_sin
from ttt.model import apply_rope, rope_rotate


def _model(**over: object) -> TTTModel:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("debug", **{"vocab_size": 97, "window": 24, "ttt_chunk": 8, **over})
    m = TTTModel(cfg).double()
    with torch.no_grad():  # a W0 far from the meta-learned optimum: large, visible TTT updates
        for n in m.fast_names():
            m.get_parameter(n + ".weight").mul_(8.0)
    return m.eval()


def _compare(model: TTTModel, prompt_len: int, n_steps: int, batch: int = 1) -> float:
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g)
    feed = torch.randint(0, model.cfg.vocab_size, (batch, n_steps), generator=g)
    state = model.prefill(prompt).state
    sess = DecodeSession(model, state, max_new_tokens=n_steps)
    worst = 0.0
    for t in range(n_steps):
        out = model.prefill(feed[:, t : t + 1], state)
        state = out.state
        got = sess.step(feed[:, t])
        worst = max(worst, (got - out.last_logits).abs().max().item())
    return worst


@pytest.mark.parametrize("prompt_len", [5, 16, 30, 41])
def test_session_equals_prefill_ttt(prompt_len: int) -> None:
    # 40 steps with b=8 and window 24: 5 TTT steps and a ring that wraps around (or starts full)
    assert _compare(_model(), prompt_len, 40) < 1e-9


def test_session_batch_and_ttt_changes_logits() -> None:
    model = _model()
    assert _compare(model, 13, 30, batch=2) < 1e-9
    # the comparison is not vacuous: with TTT off the logits differ by far more than the tolerance
    frozen = _model(ttt_lr=0.0)
    prompt = torch.randint(0, 97, (1, 13))
    a = DecodeSession(model, model.prefill(prompt).state, max_new_tokens=20)
    b = DecodeSession(frozen, frozen.prefill(prompt).state, max_new_tokens=20)
    diff = max((a.step(t) - b.step(t)).abs().max().item() for t in torch.randint(0, 97, (20, 1)))
    assert diff > 1e-3


@pytest.mark.parametrize("kind", ["fa", "swa"])
def test_session_equals_prefill_no_ttt(kind: str) -> None:
    over = {"n_ttt_layers": 0, "window": None} if kind == "fa" else {"n_ttt_layers": 0}
    assert _compare(_model(**over), 11, 30) < 1e-9


def test_generate_session_matches_reference_fp32() -> None:
    torch.manual_seed(1)
    model = TTTModel(ModelConfig.from_name("debug", vocab_size=97, window=24, ttt_chunk=8)).eval()
    prompt = torch.randint(0, 97, (2, 19))
    ref = model.generate(prompt, max_new_tokens=40, decoder="prefill")
    got = model.generate(prompt, max_new_tokens=40, decoder="session")
    assert torch.equal(ref, got)
    with pytest.raises(ValueError, match="decoder"):
        model.generate(prompt, max_new_tokens=2, decoder="fast")


def test_rope_absolute_positions_exact_at_a_million() -> None:
    # float64 angles: rotating by a far absolute position keeps q.k a function of the offset only
    D, theta = 16, 10000.0
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float64), torch.randn(1, 1, 1, D, dtype=torch.float64)
    far = torch.tensor([1_000_003, 1_000_000])
    cq, sq = rope_cos_sin(far[:1], D, theta, torch.float32)
    ck, sk = rope_cos_sin(far[1:], D, theta, torch.float32)
    s_far = (rope_rotate(q.float(), cq, sq, True) * rope_rotate(k.float(), ck, sk, True)).sum()
    s_near = (apply_rope(q, 3, theta, True) * apply_rope(k, 0, theta, True)).sum()
    assert abs(s_far.item() - s_near.item()) < 1e-4 * max(1.0, abs(s_near.item()))


@pytest.mark.parametrize("window", [None, 24])
def test_plain_model_prefill_head_slices_equal_forward(
    monkeypatch: pytest.MonkeyPatch, window: int | None
) -> None:
    """A no-TTT prefill scores long inputs a slice of positions at a time: same NLL as the one-shot forward."""
    import ttt.inner

    monkeypatch.setattr(ttt.inner, "HEAD_SLICE", 5)
    model = _model(n_ttt_layers=0, window=window)
    x = torch.randint(0, 97, (2, 37))
    out = model.prefill(x)
    logp = torch.log_softmax(model(x), -1)  # (B, T, V)
    ref = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    assert (out.token_nll[:, 1:] - ref).abs().max().item() < 1e-10
    assert (out.last_logits - model(x)[:, -1]).abs().max().item() < 1e-10


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_masked_static_buffer_attention_equals_attention_over_the_filled_slots(hkv: int) -> None:
    """The graphed full-attention decode attends over its whole static buffer with a mask of the filled
    slots (``decode_attention(valid=)``, ``masked_math_attention``): == SDPA over exactly those slots; the
    garbage in the unfilled slots must not leak in (it would, through an unmasked or misaligned softmax)."""
    from ttt.decode import decode_attention, masked_math_attention

    g = torch.Generator().manual_seed(hkv)
    q = torch.randn(2, 4, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, 50, 16, generator=g, dtype=torch.float64) * 3
    v = torch.randn(2, hkv, 50, 16, generator=g, dtype=torch.float64) * 3
    for pos in (0, 1, 17, 49):
        valid = torch.arange(50) <= pos
        kk, vv = (t[:, :, : pos + 1].repeat_interleave(4 // hkv, dim=1) for t in (k, v))
        ref = torch.softmax(q @ kk.transpose(-1, -2) / 4.0, dim=-1) @ vv  # (B, H, 1, D)
        for out in (decode_attention(q, k, v, hkv != 4, valid), masked_math_attention(q, k, v, valid)):
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
