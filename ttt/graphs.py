"""CUDA graph of prefill's steady-state TTT chunk step (GPU fast path, opt-in: ``ttt.inner.CHUNK_GRAPHS``).

Once every TTT block's committed cache holds ``window - 1`` keys, each chunk step has the same shapes: b inputs,
b targets, fixed-size caches, the fast weights. Run eagerly, the step is about 2,500 kernel-launching ATen calls
from Python autograd (3b layer structure: forward of the TTT blocks and head, ``autograd.grad`` to the fast
weights, clip, SGD, cache update). On the H100 the 125m model, with ~40x less arithmetic per chunk than 3b, paid
23 ms per chunk over SWA against 3b's 37.5 ms, and a profile of a 125m prefill had the device busy for at most 29% of
the wall time. Replaying one captured graph removes the host work: 125m prefill 1.43x faster at 16K, 1.80x at 32K
(``eval/bench_latency.py --compare-graph``, H100).

The graph reads its inputs from static buffers and ends by writing the new fast weights and caches back into
the buffers it read them from, so consecutive chunks replay with no copies of the state in between. Callers
copy the buffers out before the graph is replayed for another sequence (``ttt.inner._SuffixRun.release_graph``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from ttt.model import KV, TTTModel

# one graph per (model, batch, dtypes, backend): its memory pool holds the step's intermediates
_GRAPHS: weakref.WeakKeyDictionary[TTTModel, dict[tuple, ChunkStepGraph]] = weakref.WeakKeyDictionary()


def supported(h: torch.Tensor) -> bool:
    """Whether a step on ``h``'s device can be captured (CUDA only)."""
    return h.is_cuda


def capture(fn: Callable[[], Any], warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn`` (static inputs, no host syncs) run ``warmup`` times on a side stream (compiles, allocator, block
    masks), then recorded as a CUDA graph; returns (graph, the outputs every replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class ChunkStepGraph:
    """A captured ``suffix_chunk_step(update=True)`` for caches of ``window - 1`` keys and chunks of b inputs."""

    def __init__(
        self, model: TTTModel, fast: dict[str, torch.Tensor], kv: list[KV], h: torch.Tensor, backend: str
    ) -> None:
        cfg = model.cfg
        assert cfg.window is not None and supported(h), "chunk graphs need a windowed model on CUDA"
        assert h.shape[1] == cfg.ttt_chunk, f"a graph step takes whole chunks, got {h.shape[1]} inputs"
        assert all(k.shape[2] == cfg.window - 1 for k, _ in kv), "a graph step needs full caches"
        self.model, self.backend = model, backend
        self.params = [p for p in model.parameters()]  # the graph reads them at these addresses
        self.param_ptrs = self.addresses()
        self.h = torch.empty_like(h)  # (B, b, d)
        self.targets = torch.zeros(h.shape[0], cfg.ttt_chunk, dtype=torch.long, device=h.device)
        self.fast = {k: torch.empty_like(v) for k, v in fast.items()}
        self.kv = [(torch.empty_like(k), torch.empty_like(v)) for k, v in kv]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out_last: torch.Tensor | None = None  # (B, V) logits of the chunk's last input
        self.out_nll: torch.Tensor | None = None  # (B, b)

    def addresses(self) -> tuple[int, ...]:
        """Where the model's parameters live now (``model.to(...)`` and back moves them: the graph is stale)."""
        return tuple(p.data_ptr() for p in self.params)

    @staticmethod
    def key(fast: dict[str, torch.Tensor], kv: list[KV], h: torch.Tensor, backend: str) -> tuple:
        return (h.shape, h.dtype, kv[0][0].dtype, next(iter(fast.values())).dtype, backend, h.device)

    def load(self, fast: dict[str, torch.Tensor], kv: list[KV]) -> None:
        """Copy a state's fast weights and caches into the buffers (skipped for the buffers themselves)."""
        for name, w in fast.items():
            if w.data_ptr() != self.fast[name].data_ptr():
                self.fast[name].copy_(w)
        for (k, v), (sk, sv) in zip(kv, self.kv, strict=True):
            if k.data_ptr() != sk.data_ptr():
                sk.copy_(k)
                sv.copy_(v)

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        from ttt.inner import chunk_update

        # W_i is written straight into the fast-weight buffers (fused update, no copy back)
        _, kv, last, nll = chunk_update(
            self.model, self.fast, self.kv, self.h, self.targets, self.backend, into=self.fast
        )
        for (sk, sv), (k, v) in zip(self.kv, kv, strict=True):  # the gradients are taken: overwrite now
            sk.copy_(k)
            sv.copy_(v)
        return last, nll

    def capture(self) -> None:
        """Record one step (after warm-up steps, which change the buffers: callers ``load`` the real state)."""
        self.graph, (self.out_last, self.out_nll) = capture(self._step)

    def run(
        self, fast: dict[str, torch.Tensor], kv: list[KV], h: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk: (last-input logits (B, V), NLL (B, b)) scored before the update; state updated in place."""
        assert self.graph is not None and self.out_last is not None and self.out_nll is not None
        self.load(fast, kv)
        self.h.copy_(h)
        self.targets.copy_(targets)
        self.graph.replay()
        return self.out_last, self.out_nll


def chunk_graph(
    model: TTTModel, fast: dict[str, torch.Tensor], kv: list[KV], h: torch.Tensor, backend: str
) -> ChunkStepGraph:
    """The cached graph for this model and these shapes, captured on first use."""
    graphs: dict[tuple, Any] = _GRAPHS.setdefault(model, {})
    key = ChunkStepGraph.key(fast, kv, h, backend)
    if key in graphs and graphs[key].addresses() != graphs[key].param_ptrs:
        del graphs[key]  # captured over parameters that have since moved: replaying would read freed memory
    if key not in graphs:
        g = ChunkStepGraph(model, fast, kv, h, backend)
        g.load(fast, kv)
        g.h.copy_(h)
        g.capture()
        graphs[key] = g
    return graphs[key]
