"""Decoding: cached generation (SWA cache + TTT every b tokens) equals full recomputation; sampling rules.
Run: .venv/bin/python -m pytest -q tests/test_ttt_generate.py"""

from __future__ import annotations

import pytest
import torch
from test_ttt_model import model64, tiny

from ttt.generate import sample_next


@pytest.mark.parametrize(
    "kw", [dict(window=6), dict(window=None, n_ttt_layers=0), dict(window=5, n_ttt_layers=2)]
)
def test_cached_generation_equals_full_recomputation(kw: dict) -> None:
    cfg = tiny(**kw)
    m = model64(cfg, seed=5)
    prompt = torch.randint(0, cfg.vocab_size, (2, 7))
    n_new = 3 * cfg.ttt_chunk + 2  # crosses several TTT updates during decoding
    gen = m.generate(prompt, max_new_tokens=n_new)
    assert gen.shape == (2, n_new)
    seq = prompt
    for i in range(n_new):
        ref = m.prefill(seq).last_logits  # fresh one-shot prefill of everything so far
        assert torch.equal(ref.argmax(-1), gen[:, i]), f"step {i}"
        seq = torch.cat((seq, gen[:, i : i + 1]), 1)
    if cfg.n_ttt_layers == 0:  # without TTT, also equal to the plain forward
        assert torch.equal(m(seq[:, :-1])[:, prompt.shape[1] - 1 :].argmax(-1), gen)


def test_generation_continues_from_state_and_stops_at_eos() -> None:
    cfg = tiny()
    m = model64(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, 9))
    st = m.prefill(prompt).state
    a = m.generate(prompt, max_new_tokens=6)
    b = m.generate(None, st, max_new_tokens=6)
    assert torch.equal(a, b)
    eos = int(a[0, 2])
    c = m.generate(prompt, max_new_tokens=6, eos_id=eos)
    first = int((a[0] == eos).nonzero()[0])
    assert c.shape[1] == first + 1 and int(c[0, -1]) == eos
    with pytest.raises(ValueError, match="non-empty prompt"):
        m.generate(None, None, max_new_tokens=2)


def test_sampling_respects_top_p_and_temperature() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    s = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(s.tolist()) == {0, 1}  # nucleus = {0.5, 0.3}
    frac = (s == 0).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 0.03
    s = sample_next(logits, temperature=1.0, generator=g)
    counts = torch.bincount(s, minlength=4).float() / len(s)
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    assert torch.equal(sample_next(logits[:2], temperature=0.0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, temperature=1.0, top_p=0.0)


def test_prefill_and_generate_work_under_inference_mode() -> None:
    cfg = tiny()
    m = model64(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, 2 * cfg.ttt_chunk + 3))
    ref = m.generate(prompt, max_new_tokens=5)
    with torch.inference_mode():
        out = m.prefill(prompt)
        got = m.generate(None, out.state, max_new_tokens=5)
    assert torch.equal(got, ref)


def test_context_aware_decoding_equals_recomputed_contrast_and_is_a_no_op_against_itself() -> None:
    """contrast_prompt / contrast_alpha: greedy argmax of (1 + a) * logits(prompt + out) - a * logits(contrast
    + out), both streams with TTT (prefill decoder), against a from-scratch prefill of each at every step; a
    contrast prompt equal to the prompt changes nothing ((1 + a) L - a L = L)."""
    cfg = tiny()
    m = model64(cfg)
    g = torch.Generator().manual_seed(3)
    p = torch.randint(0, cfg.vocab_size, (1, 21), generator=g)
    c = torch.randint(0, cfg.vocab_size, (1, 6), generator=g)
    a = 0.7
    got = m.generate(p, max_new_tokens=10, contrast_prompt=c, contrast_alpha=a)[0].tolist()
    out: list[int] = []
    for _ in range(10):
        lp = m.prefill(torch.cat([p, torch.tensor([out], dtype=torch.long)], 1)).last_logits
        lc = m.prefill(torch.cat([c, torch.tensor([out], dtype=torch.long)], 1)).last_logits
        out.append(int(((1 + a) * lp - a * lc).argmax()))
    assert got == out
    plain = m.generate(p, max_new_tokens=10)[0].tolist()
    assert m.generate(p, max_new_tokens=10, contrast_prompt=p, contrast_alpha=a)[0].tolist() == plain
    assert got != plain, "the contrast must change this greedy path (else the first check proves nothing)"
    with pytest.raises(ValueError, match="contrast_alpha"):
        m.generate(p, max_new_tokens=2, contrast_prompt=c, contrast_alpha=-1.0)
