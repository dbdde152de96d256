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

When the step's attention runs our Triton kernels (``masked_steps``), one captured step also serves caches that are
still filling up (the first ``window / b`` chunks of a sequence, or a state with fewer keys): the ring holds them
right-aligned in the window and the kernels read the first valid key from a device scalar (``RingKV.key_lo``), which
``set_positions`` updates before each replay. H100, 3b, session 7 -> 11: 8K prefill 0.0748 -> 0.0432 s per 1K tokens with the
kernels (``eval/results/latency-3b-h100-s11.json``).

The TTT blocks' caches live in a ``RingKV``: per block, buffers of ``n + M*b`` positions (n = window - 1 committed
keys, b = chunk, M = ceil(n / b)) where a chunk step attends over the window ``[p*b, p*b + n + b)`` of phase p and
writes its b new keys into the window's tail, so nothing is concatenated; every M steps the last n positions move
to the front (one copy of n keys per M chunks instead of two to three per chunk). Keys are kept RoPE-rotated once,
at positions that continue across chunks (RoPE depends only on offsets), beside their pre-RoPE values for the
state. One graph per phase, sharing one memory pool. H100, 3b, 128K: 0.0486 -> 0.0423 s per 1K tokens together with
the bf16 weight copies (``ChunkStepGraph.shadow``; ``eval/results/latency-3b-h100-s7-repeats.json``).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ttt.model import KV, CacheWindow, TTTModel, rope_rotate

# one graph per (model, batch, dtypes, backend): its memory pool holds the step's intermediates
_GRAPHS: weakref.WeakKeyDictionary[TTTModel, dict[tuple, ChunkStepGraph]] = weakref.WeakKeyDictionary()


def supported(h: torch.Tensor) -> bool:
    """Whether a step on ``h``'s device can be captured (CUDA only)."""
    return h.is_cuda


def capture(fn: Callable[[], Any], warmup: int = 2, pool: Any = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn`` (static inputs, no host syncs) run ``warmup`` times on a side stream (compiles, allocator, block
    masks), then recorded as a CUDA graph (in memory ``pool``, e.g. another graph's ``pool()``, when given);
    returns (graph, the outputs every replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class RingKV:
    """The TTT blocks' caches of a graphed prefill, in place (see the module docstring)."""

    def __init__(
        self, kv: list[KV], window: int, chunk: int, theta: float, interleaved: bool, masked: bool = False
    ) -> None:
        k0 = kv[0][0]
        B, Hkv, m, D = k0.shape
        n = window - 1  # committed keys a step attends over once the caches are full
        assert m == n or (masked and m < n), (
            f"a ring starts from full caches of {n} keys (or masked), got {m}"
        )
        self.n, self.b = n, chunk
        # masked: caches still filling up are right-aligned in the window, key_lo (window-relative) marks the first
        # key; the attention reads it from the device, so one captured step serves every fill level
        self.masked = masked
        self.valid = m
        self.key_lo = torch.zeros(1, dtype=torch.int32, device=k0.device)
        self.phases = max(1, math.ceil(n / chunk))  # phases * b >= n: the wrap copy never overlaps itself
        size = n + self.phases * chunk
        self.theta, self.interleaved, self.head_dim = theta, interleaved, D

        def buffers() -> list[torch.Tensor]:
            # (B, Hkv, size, D) views of token-major (B, size, Hkv, D) memory: the layout of the projections'
            # (B, T, Hkv, D) outputs, so writing a chunk's keys in is one contiguous run per batch row instead of a
            # strided transpose (H100 s11 profile: ~15 us per such copy, 3 per TTT block and chunk); the Triton
            # kernels read any row stride (they run on the prefix's token-major views at full speed)
            return [
                torch.zeros(B, size, Hkv, D, dtype=k0.dtype, device=k0.device).transpose(1, 2) for _ in kv
            ]

        self.k_raw = buffers()  # (B, Hkv, size, D) pre-RoPE keys (what a state holds)
        self.k_rot = buffers()  # the same keys rotated (what attention reads)
        self.v = buffers()
        self.rope_dtype = torch.promote_types(k0.dtype, torch.float32)
        self.cos = torch.zeros(chunk, D // 2, dtype=self.rope_dtype, device=k0.device)  # (b, D/2)
        self.sin = torch.zeros_like(self.cos)
        self.phase, self.steps = 0, 0

    def _cos_sin(self, start: int, n: int) -> tuple[torch.Tensor, ...]:
        from ttt.decode import rope_cos_sin

        pos = torch.arange(start, start + n, device=self.cos.device)
        return rope_cos_sin(pos, self.head_dim, self.theta, self.rope_dtype)

    def load(self, kv: list[KV]) -> None:
        """Committed pre-RoPE caches (B, Hkv, m, D), m = n (or fewer when masked), in at positions n-m..n-1;
        phase 0."""
        n, m = self.n, kv[0][0].shape[2]
        assert m == n or (self.masked and m < n), f"caches of {m} keys in a ring of {n} that is not masked"
        cos, sin = self._cos_sin(n - m, m)
        for (k, v), kr, kq, vb in zip(kv, self.k_raw, self.k_rot, self.v, strict=True):
            kr[:, :, n - m : n].copy_(k)
            vb[:, :, n - m : n].copy_(v)
            kq[:, :, n - m : n].copy_(rope_rotate(k, cos, sin, self.interleaved))
        self.phase, self.steps, self.valid = 0, 0, m

    def committed(self) -> list[KV]:
        """Views of the pre-RoPE caches before the next step: (B, Hkv, m, D) each, m = the keys held (<= n)."""
        e = self.phase * self.b + self.n
        return [(kr[:, :, e - self.valid : e], vb[:, :, e - self.valid : e])
                for kr, vb in zip(self.k_raw, self.v, strict=True)]  # fmt: skip

    def windows(self, phase: int) -> list[CacheWindow]:
        """What a step in ``phase`` attends over: n committed + b free positions per block."""
        s, e = phase * self.b, phase * self.b + self.n + self.b
        lo = self.key_lo if self.masked else None
        return [CacheWindow(k=kq[:, :, s:e], v=vb[:, :, s:e], cos=self.cos, sin=self.sin, key_lo=lo)
                for kq, vb in zip(self.k_rot, self.v, strict=True)]  # fmt: skip

    def set_positions(self) -> None:
        """The coming chunk's cos/sin and first cached key (outside the graph: a few tiny kernels per chunk)."""
        cos, sin = self._cos_sin(self.n + self.steps * self.b, self.b)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        if self.masked:
            self.key_lo.fill_(self.n - self.valid)

    def commit(self, new_k: list[torch.Tensor], phase: int) -> None:
        """Inside the step: the chunk's pre-RoPE keys (B, Hkv, b, D) into their slots (the attention wrote the
        rotated keys and the values); after the last phase the newest n positions move to the front."""
        s = phase * self.b + self.n
        for k, kr in zip(new_k, self.k_raw, strict=True):
            kr[:, :, s : s + self.b].copy_(k)
        if phase == self.phases - 1:
            src = slice(self.phases * self.b, self.phases * self.b + self.n)
            for buf in (*self.k_raw, *self.k_rot, *self.v):
                buf[:, :, : self.n].copy_(buf[:, :, src])

    def advance(self) -> None:
        self.phase, self.steps = (self.phase + 1) % self.phases, self.steps + 1
        self.valid = min(self.n, self.valid + self.b)

    def owns(self, t: torch.Tensor) -> bool:
        return any(t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                   for b in (*self.k_raw, *self.v))  # fmt: skip


class ChunkStepGraph:
    """Captured ``suffix_chunk_step(update=True)`` steps, one per ring phase, for caches of ``window - 1`` keys
    and chunks of b inputs."""

    def __init__(
        self, model: TTTModel, fast: dict[str, torch.Tensor], kv: list[KV], h: torch.Tensor, backend: str
    ) -> None:
        cfg = model.cfg
        assert cfg.window is not None and supported(h), "chunk graphs need a windowed model on CUDA"
        assert h.shape[1] == cfg.ttt_chunk, f"a graph step takes whole chunks, got {h.shape[1]} inputs"
        masked = masked_steps(model, h, backend)
        assert all(k.shape[2] == cfg.window - 1 or masked for k, _ in kv), "a graph step needs full caches"
        self.model, self.backend = model, backend
        self.params = [p for p in model.parameters()]  # the graph reads them at these addresses
        self.param_ptrs = self.addresses()
        self.h = torch.empty_like(h)  # (B, b, d)
        self.targets = torch.zeros(h.shape[0], cfg.ttt_chunk, dtype=torch.long, device=h.device)
        self.fast = {k: torch.empty_like(v) for k, v in fast.items()}  # fp32 W_i
        # the model-dtype copies of W_i the step differentiates (None when the model computes in fp32): the forward
        # then reads 2-byte weights without casting 4-byte ones, and the gradients need no cast back
        lp = h.dtype
        self.shadow = (
            None
            if lp == next(iter(fast.values())).dtype
            else {k: torch.empty(v.shape, dtype=lp, device=v.device) for k, v in self.fast.items()}
        )
        self.ring = RingKV(kv, cfg.window, cfg.ttt_chunk, cfg.rope_theta, cfg.rope_interleaved, masked)
        P = self.ring.phases
        self.graphs: list[Any] = [None] * P  # torch.cuda.CUDAGraph per phase
        self.out_last: list[torch.Tensor | None] = [None] * P  # (B, V) logits of the chunk's last input
        self.out_nll: list[torch.Tensor | None] = [None] * P  # (B, b)

    def addresses(self) -> tuple[int, ...]:
        """Where the model's parameters live now (``model.to(...)`` and back moves them: the graph is stale)."""
        return tuple(p.data_ptr() for p in self.params)

    @property
    def kv(self) -> list[KV]:
        """The committed caches as they stand (views of the ring's buffers)."""
        return self.ring.committed()

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in this graph's buffers (a replay would overwrite it)."""
        fast = any(t.data_ptr() == w.data_ptr() for w in self.fast.values())
        return fast or self.ring.owns(t)

    @staticmethod
    def key(
        model: TTTModel, fast: dict[str, torch.Tensor], kv: list[KV], h: torch.Tensor, backend: str
    ) -> tuple:
        dtypes = (h.dtype, kv[0][0].dtype, next(iter(fast.values())).dtype)
        return (h.shape, *dtypes, backend, masked_steps(model, h, backend), h.device)

    def load(self, fast: dict[str, torch.Tensor], kv: list[KV]) -> None:
        """Copy a state's fast weights and caches into the buffers (skipped for the buffers themselves)."""
        for name, w in fast.items():
            if w.data_ptr() != self.fast[name].data_ptr():
                self.fast[name].copy_(w)
                if self.shadow is not None:
                    self.shadow[name].copy_(w)
        mine = self.ring.committed()
        if any(k.data_ptr() != rk.data_ptr() or v.data_ptr() != rv.data_ptr() or k.shape != rk.shape
               for (k, v), (rk, rv) in zip(kv, mine, strict=True)):  # fmt: skip
            self.ring.load(kv)

    def _step(self, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        from ttt.inner import sgd_step, suffix_chunk_step

        cfg = self.model.cfg
        with torch.enable_grad():
            f = {k: v.detach().requires_grad_(True) for k, v in (self.shadow or self.fast).items()}
            out = suffix_chunk_step(self.model, f, self.ring.windows(phase), self.h, self.targets,
                                    lr=cfg.ttt_lr, update=False, create_graph=False, backend=self.backend)  # fmt: skip
            grads = torch.autograd.grad(out.loss.sum(), list(f.values()))
        # W_i is written straight into the fast-weight buffers (fused update, no copy back)
        sgd_step(self.fast, list(grads), cfg.ttt_lr, cfg.ttt_clip, into=self.fast, shadow=self.shadow)
        self.ring.commit([k.detach() for k, _ in out.kv], phase)  # the gradients are taken: overwrite now
        return out.logits[:, -1].detach(), out.nll.detach()

    def capture(self) -> None:
        """Record every phase's step (after warm-up steps, which change the buffers: callers ``load`` the real
        state). The phases replay one after another, never concurrently: they share one memory pool."""
        pool = None
        for p in range(self.ring.phases):
            fn = functools.partial(self._step, p)
            self.graphs[p], (self.out_last[p], self.out_nll[p]) = capture(fn, 2 if p == 0 else 1, pool)
            pool = self.graphs[0].pool()

    def run(
        self, fast: dict[str, torch.Tensor], kv: list[KV], h: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk: (last-input logits (B, V), NLL (B, b)) scored before the update; state updated in place.
        The outputs are overwritten by the next replay of the same phase."""
        self.load(fast, kv)
        self.h.copy_(h)
        self.targets.copy_(targets)
        p = self.ring.phase
        last, nll, graph = self.out_last[p], self.out_nll[p], self.graphs[p]
        assert graph is not None and last is not None and nll is not None, "capture() first"
        self.ring.set_positions()
        graph.replay()
        self.ring.advance()
        return last, nll


def masked_steps(model: TTTModel, h: torch.Tensor, backend: str) -> bool:
    """Whether the chunk steps' attention runs our Triton kernels (``backend``, or auto's chunk choice), which read
    the first cached key from the device: then one graph serves caches that are still filling up (the first
    ``window / b`` chunks of a sequence), not only full ones."""
    from ttt import attention as att

    cfg = model.cfg
    # what the TTT blocks' attention receives: (B, H, b, D)
    q = h.new_empty(h.shape[0], cfg.n_heads, h.shape[1], cfg.head_dim)
    assert cfg.window is not None, "chunk graphs need a windowed model"
    tk = cfg.window - 1 + h.shape[1]
    return (att.auto_backend(q, tk, cfg.window) if backend == "auto" else backend) == "triton"


def chunk_graph(
    model: TTTModel, fast: dict[str, torch.Tensor], kv: list[KV], h: torch.Tensor, backend: str
) -> ChunkStepGraph:
    """The cached graph for this model and these shapes, captured on first use."""
    graphs: dict[tuple, Any] = _GRAPHS.setdefault(model, {})
    key = ChunkStepGraph.key(model, fast, kv, h, backend)
    if key in graphs and graphs[key].addresses() != graphs[key].param_ptrs:
        del graphs[key]  # captured over parameters that have since moved: replaying would read freed memory
    if key not in graphs:
        g = ChunkStepGraph(model, fast, kv, h, backend)
        g.load(fast, kv)
        g.h.copy_(h)
        g.capture()
        graphs[key] = g
    return graphs[key]
