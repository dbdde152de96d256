"""The graphed prefill's in-place caches (``ttt.graphs.RingKV``) on CPU: what a state reads back after steps equals
the last ``window - 1`` keys of everything written, for caches that start full and (masked) ones still filling up;
the device-side first key tracks the fill level."""

from __future__ import annotations

import pytest
import torch

from ttt.decode import rope_cos_sin
from ttt.graphs import RingKV
from ttt.model import rope_rotate


def _run(m: int, steps: int, masked: bool) -> None:
    window, b, B, H, D = 10, 4, 2, 3, 8  # n = 9 committed keys, 3 phases
    n = window - 1
    torch.manual_seed(m)
    ks = torch.randn(B, H, m + steps * b, D, dtype=torch.float64)
    vs = torch.randn_like(ks)
    kv = [(ks[:, :, :m], vs[:, :, :m])]
    ring = RingKV(kv, window, b, theta=10000.0, interleaved=False, masked=masked)
    ring.load(kv)
    for s in range(steps):
        ring.set_positions()
        if masked:
            assert ring.key_lo.item() == n - min(n, m + s * b)
        win = ring.windows(ring.phase)[0]
        new_k, new_v = ks[:, :, m + s * b : m + (s + 1) * b], vs[:, :, m + s * b : m + (s + 1) * b]
        win.v[:, :, n:].copy_(new_v)  # what the attention writes into the window's free slots
        win.k[:, :, n:].copy_(rope_rotate(new_k, ring.cos, ring.sin, False))
        ring.commit([new_k], ring.phase)
        ring.advance()
        end = m + (s + 1) * b
        k, v = ring.committed()[0]
        assert torch.equal(k, ks[:, :, max(0, end - n) : end]) and torch.equal(
            v, vs[:, :, max(0, end - n) : end]
        )
        # the next window's rotated keys: those keys at positions continuing the loaded ones' (n - m .. n - 1), i.e.
        # the last ``kept`` before the coming chunk's (RoPE sees only offsets)
        kept = k.shape[2]
        pos = torch.arange(n + ring.steps * b - kept, n + ring.steps * b)
        cos, sin = rope_cos_sin(pos, D, 10000.0, torch.float64)
        rot = ring.windows(ring.phase)[0].k[:, :, n - kept : n]
        assert torch.allclose(rot, rope_rotate(k, cos, sin, False), atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_full_ring_keeps_the_last_window_of_keys(steps: int) -> None:
    _run(9, steps, masked=False)


@pytest.mark.parametrize(("m", "steps"), [(0, 1), (0, 5), (3, 4), (8, 2)])
def test_masked_ring_fills_up_then_slides(m: int, steps: int) -> None:
    _run(m, steps, masked=True)


def test_unmasked_ring_refuses_caches_that_are_not_full() -> None:
    k = torch.zeros(1, 1, 5, 8)
    with pytest.raises(AssertionError, match="full caches"):
        RingKV([(k, k)], 10, 4, theta=10000.0, interleaved=False)
