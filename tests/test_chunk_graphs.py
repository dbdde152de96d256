"""Prefill's CUDA-graphed chunk step (ttt/graphs.py): the buffer bookkeeping, on CPU in float64.

The capture itself needs CUDA (tests/test_ttt_gpu.py replays a real graph); here ``capture`` is replaced by an
eager stand-in that, like a replay, recomputes the step from the static buffers and writes its outputs into fixed
tensors. What is checked is everything around it: whole chunks go through the buffers, the new fast weights and
caches are written back in place, the state a prefill returns is copied out of them, and a later replay (another
sequence, or the same one continued) never changes a state returned earlier.
"""

from __future__ import annotations

import pytest
import torch
from ttt_reference import prefill_distance

from ttt import ModelConfig, TTTModel, graphs, inner


class _EagerReplay:
    def __init__(self, g: graphs.ChunkStepGraph, phase: int) -> None:
        self.g, self.phase = g, phase
        self.replays = 0

    def replay(self) -> None:
        last, nll = self.g._step(self.phase)
        self.g.out_last[self.phase].copy_(last)
        self.g.out_nll[self.phase].copy_(nll)
        self.replays += 1


def _fake_capture(self: graphs.ChunkStepGraph) -> None:
    for p in range(self.ring.phases):
        self._step(p)  # a warm-up changes the buffers, as the real one does
        self.out_last[p], self.out_nll[p] = (t.clone() for t in self._step(p))
        self.graphs[p] = _EagerReplay(self, p)


def _replays(g: graphs.ChunkStepGraph) -> int:
    return sum(r.replays for r in g.graphs)


@pytest.fixture
def graphed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(graphs, "supported", lambda h: True)
    monkeypatch.setattr(graphs.ChunkStepGraph, "capture", _fake_capture)
    monkeypatch.setattr(graphs, "_GRAPHS", graphs.weakref.WeakKeyDictionary())
    monkeypatch.setattr(inner, "CHUNK_GRAPHS", True)
    return graphs


def _model() -> TTTModel:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("debug", vocab_size=96, window=16, ttt_chunk=4, n_layers=3, n_ttt_layers=2)
    return TTTModel(cfg).double().eval()


def _same_state(a, b) -> None:
    for k in a.fast:
        torch.testing.assert_close(a.fast[k], b.fast[k], rtol=0, atol=1e-12)
    for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True):
        torch.testing.assert_close(ka, kb, rtol=0, atol=1e-12)
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.last_logits, b.last_logits, rtol=0, atol=1e-12)
    assert a.pos == b.pos and torch.equal(a.pending_tokens, b.pending_tokens)


def test_graphed_prefill_equals_eager_and_never_aliases_returned_states(graphed) -> None:
    m = _model()
    x = torch.randint(0, 96, (2, 75))
    inner.CHUNK_GRAPHS = False
    ref_a = m.prefill(x[:, :41])
    ref_b = m.prefill(x[:, 41:], ref_a.state)
    ref_c = m.prefill(x[:, :75])
    inner.CHUNK_GRAPHS = True
    a = m.prefill(x[:, :41])
    g = next(iter(graphs._GRAPHS[m].values()))
    assert g.ring.phases == 4 and _replays(g) >= 6, "the steady-state chunks went through every phase's graph"
    a_copy = a.state.clone()
    b = m.prefill(x[:, 41:], a.state)  # replays overwrite the buffers; a's state must not change
    c = m.prefill(x[:, :75])  # another sequence through the same graph
    torch.testing.assert_close(a.token_nll, ref_a.token_nll, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.token_nll, ref_b.token_nll, rtol=0, atol=1e-12)
    torch.testing.assert_close(c.token_nll, ref_c.token_nll, rtol=0, atol=1e-12)
    _same_state(a.state, a_copy)
    _same_state(b.state, ref_b.state)
    _same_state(c.state, ref_c.state)
    for st in (a.state, b.state, c.state):  # returned states own their memory
        assert not any(g.owns(t) for t in st.tensors().values())


def test_graph_is_not_used_before_the_caches_fill_or_for_partial_chunks(graphed) -> None:
    m = _model()
    m.prefill(torch.randint(0, 96, (1, 16)))  # 4 chunks: caches never reach window - 1 before the last commit
    assert m not in graphs._GRAPHS or not graphs._GRAPHS[m]


def test_graph_is_recaptured_when_the_parameters_move(graphed) -> None:
    """``model.to("cpu")`` and back (the latency bench does it to make room) gives the parameters new addresses;
    a graph captured over the old ones would read freed memory: it must be replaced, not replayed."""
    m = _model()
    x = torch.randint(0, 96, (1, 48))
    m.prefill(x)
    first = next(iter(graphs._GRAPHS[m].values()))
    m.prefill(x)
    assert next(iter(graphs._GRAPHS[m].values())) is first, "same parameters: the graph is reused"
    for p in m.parameters():
        p.data = p.data.clone()  # what a round trip through another device does to the addresses
    out = m.prefill(x)
    again = next(iter(graphs._GRAPHS[m].values()))
    assert again is not first and again.param_ptrs == again.addresses()
    inner.CHUNK_GRAPHS = False
    torch.testing.assert_close(out.token_nll, m.prefill(x).token_nll, rtol=0, atol=1e-12)


def test_graphed_bf16_step_with_its_bf16_weight_copies_equals_eager(graphed, monkeypatch) -> None:
    """A bf16 model: the graphed step differentiates bf16 copies of the fp32 fast weights (written by the fused
    SGD step) instead of casting the fp32 weights in every forward. The gradients are the same bf16 numbers, so
    the result is bit-identical to the step without copies; and the ring (keys rotated once, in bf16) stays well
    inside bf16's own distance from an fp32 prefill of the same weights."""

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("debug", vocab_size=96, window=16, ttt_chunk=4, n_layers=3, n_ttt_layers=2)
    m = TTTModel(cfg).to(torch.bfloat16).eval()
    m32 = TTTModel(cfg).eval()
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    x = torch.randint(0, 96, (2, 60))
    inner.CHUNK_GRAPHS = False
    ref, ref32 = m.prefill(x), m32.prefill(x)
    inner.CHUNK_GRAPHS = True
    out = m.prefill(x)
    g = next(iter(graphs._GRAPHS[m].values()))
    assert g.shadow is not None and _replays(g) >= 8
    assert all(w.dtype == torch.float32 for w in out.state.fast.values())
    init = graphs.ChunkStepGraph.__init__

    def without_copies(self, *a, **kw) -> None:
        init(self, *a, **kw)
        self.shadow = None

    monkeypatch.setattr(graphs.ChunkStepGraph, "__init__", without_copies)
    monkeypatch.setattr(graphs, "_GRAPHS", graphs.weakref.WeakKeyDictionary())
    plain = m.prefill(x)
    assert prefill_distance(out, plain) == (0.0, 0.0)
    for d, bf16_noise in zip(prefill_distance(out, ref), prefill_distance(ref, ref32), strict=True):
        assert d < 0.5 * bf16_noise, (d, bf16_noise)
