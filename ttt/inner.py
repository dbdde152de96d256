"""Test-time training: the inner SGD step, prefill (inference) and meta_loss (training), ``ttt-e2e.md`` §2.

Rule (official ``loss_for_sequence``): inputs x_0..x_{T-1}, target of input t is x_{t+1}. Inputs are cut into
contiguous chunks of b = ``ttt_chunk``. Chunk i is scored with W_{i-1} (predict), then W_i = W_{i-1} - lr *
clip(grad of the chunk's mean next-token CE at W_{i-1}) (update). The clip is by global norm over all fast
weights of all TTT blocks of one sequence jointly, optax semantics (scale = min(1, clip / ||g||), no epsilon),
and stays inside the autograd graph. Prefix blocks never see fast weights, so they run once over the input.

Streaming rule (prefill): a chunk's update happens as soon as the token after its last input is known (its
last target). Until then the chunk is *pending*: its positions are scored with W_{i-1}, their suffix-input
hidden states and token ids are kept in the state, and the update recomputes the chunk's suffix forward with
gradients. Hence ``prefill(x)`` equals ``prefill(x[:, :m])`` then ``prefill(x[:, m:], state)`` for any m.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from ttt.model import KV, CacheWindow, TTTModel, check_tokens, compiled, fused_enabled, unfused
from ttt.state import TTTState

HEAD_SLICE = 8192  # positions per output-head call when a plain (no-TTT) model scores a long input
# GPU fast path, opt-in: replay prefill's steady-state chunk steps from one CUDA graph (ttt/graphs.py)
CHUNK_GRAPHS = False
# GPU fast path: prefill's chunk steps take the compiled head + NLL (``head_nll``); off = the eager head
HEAD_FUSED = True


class PrefillOutput(NamedTuple):
    token_nll: torch.Tensor  # (B, T) NLL of token t given everything before it (0 at t=0 of a fresh sequence)
    state: TTTState
    last_logits: torch.Tensor  # (B, V) fp32 prediction for the next token


class ChunkOut(NamedTuple):
    logits: torch.Tensor  # (B, n, V) scored with W_{i-1}; (B, 1, V), the last input's only, when head_fused
    nll: torch.Tensor  # (B, n)
    loss: torch.Tensor  # (B,) masked mean CE of each row's chunk
    fast: dict[str, torch.Tensor]  # W_i (or W_{i-1} when update=False)
    kv: list[KV]  # the chunk's own pre-RoPE (k, v) per TTT block


# ---- inner optimiser -------------------------------------------------------------------------------
def clip_scale(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Per-row global-norm clip factor (B,) of (B, ...) gradients; differentiable, optax semantics, no epsilon.

    scale_b = 1 if ||g_b|| <= max_norm else max_norm / ||g_b||, with ||g_b|| over all tensors jointly.
    """
    if any(g.requires_grad for g in grads):  # meta_loss differentiates through the clip: the smooth form
        sq = sum(_up(g).pow(2).flatten(1).sum(1) for g in grads)  # (B,) in fp32 (fp64 for fp64 tests)
    else:  # prefill: one fused reduction per tensor instead of a squared copy, then a sum (1.4 GB at 3b)
        # fp32 accumulation of bf16 gradients without an fp32 copy of them
        sq = sum(
            torch.linalg.vector_norm(
                g.flatten(1), dim=1, dtype=torch.promote_types(g.dtype, torch.float32)
            ).square()
            for g in grads
        )
    limit = torch.full_like(sq, max_norm**2)
    # where() *before* the sqrt keeps the gradient finite when ||g|| = 0 (the unselected branch is constant)
    return max_norm / torch.sqrt(torch.where(sq > limit, sq, limit))  # (B,), == 1 when not clipped


def _rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like``, in its dtype."""
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def clip_by_global_norm(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Per-row global-norm clip of (B, ...) gradients (``clip_scale`` applied)."""
    scale = clip_scale(grads, max_norm)
    return [g * _rows(scale, g) for g in grads]


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sgd_step(
    fast: dict[str, torch.Tensor],
    grads: list[torch.Tensor],
    lr: float,
    clip: float,
    into: dict[str, torch.Tensor] | None = None,
    shadow: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """W <- W - lr * clip(g): one fused multiply-add per tensor (``addcmul`` with the per-row factor).

    Functional (new tensors) unless ``into`` names buffers to write W_i into in place (the CUDA-graph step:
    ``into`` may be the very buffers ``fast`` aliases; the gradients are taken, so overwriting them is safe).
    ``shadow`` (with ``into``): low-precision copies of W_i written by the same kernel (what the graphed step
    differentiates: its gradients then come out in bf16, as the fp32 weights' would after their cast).
    """
    coef = clip_scale(grads, clip) * -lr  # (B,)
    if into is None:
        return {
            name: torch.addcmul(w, g.to(w.dtype), _rows(coef, w))
            for (name, w), g in zip(fast.items(), grads, strict=True)
        }
    with torch.no_grad():
        for (name, w), g in zip(fast.items(), grads, strict=True):
            if shadow is None:
                torch.addcmul(w, g.to(w.dtype), _rows(coef, w), out=into[name])
                continue
            fn = compiled("sgd_shadow", _sgd_shadow, dynamic=False) if fused_enabled(w) else _sgd_shadow
            fn(w, g, _rows(coef, w), into[name], shadow[name])
    return into


def _sgd_shadow(
    w: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, out: torch.Tensor, lp: torch.Tensor
) -> None:
    """out = w + coef * g (in w's dtype) and lp = the same in lp's dtype: one pass over the weights on CUDA."""
    new = torch.addcmul(w, g.to(w.dtype), coef)
    out.copy_(new)
    lp.copy_(new)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (B, n) of logits (B, n, V) against targets (B, n).

    Flattened to (B*n, V): the (B, V, n) layout of ``cross_entropy(logits.transpose(1, 2))`` runs CUDA's
    strided "spatial" softmax kernel, measured 146 ms per 1K x 128K-vocab chunk on the H100 (80% of prefill).
    """
    B, n, V = logits.shape
    return F.cross_entropy(logits.reshape(B * n, V), targets.reshape(B * n), reduction="none").view(B, n)


def chunk_loss(
    logits: torch.Tensor, targets: torch.Tensor, bos_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (B, n) and per-row masked mean CE (B,); BOS targets are masked when bos_id is set."""
    return masked_chunk_loss(token_nll(logits, targets), targets, bos_id)


def masked_chunk_loss(
    nll: torch.Tensor, targets: torch.Tensor, bos_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll (B, n), per-row mean of nll over the targets that are not BOS (B,))."""
    if bos_id is None:
        return nll, nll.mean(1)
    mask = (targets != bos_id).to(nll.dtype)
    return nll, (nll * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _head_nll(model: TTTModel, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model.head(x)  # (B, n, V) fp32
    return logits[:, -1:], token_nll(logits, targets)


# meta_loss's chunk CE through ``ttt.xent.token_xent`` (a gradient that is differentiated again in a few fused passes)
# instead of autograd's generic upcast + log-softmax; False = the generic ops (``--train-math`` times both)
META_XENT = True


def head_nll(
    model: TTTModel, x: torch.Tensor, targets: torch.Tensor, fused: bool, second_order: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output head + per-token NLL of a chunk: (logits, nll (B, n)). ``fused`` (CUDA, first order): one compiled
    function returning only the last input's logits (B, 1, V); the (B, n, V) fp32 logits and their gradient are
    never written out (3b: 525 MB each per 1K chunk). ``second_order`` (meta_loss, with ``META_XENT``): the logits
    (B, n, V) stay in the compute dtype and the NLL is ``ttt.xent.token_xent``. Else the eager head and the full fp32
    logits (B, n, V)."""
    if second_order and META_XENT:
        from ttt.xent import token_xent

        logits = model.head(x, up=False)
        return logits, token_xent(logits, targets)
    if not fused:
        logits = model.head(x)
        return logits, token_nll(logits, targets)
    # one kernel per chunk shape (constant within a prefill)
    return compiled("head_nll", _head_nll, dynamic=False)(model, x, targets)


# ---- the per-chunk step (one function, so a GPU fast path can replace or compile it) ----------------
def suffix_chunk_step(
    model: TTTModel,
    fast: dict[str, torch.Tensor],
    kv: list[KV] | list[CacheWindow],
    h: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float,
    update: bool,
    create_graph: bool,
    backend: str,
) -> ChunkOut:
    """Score one chunk with the current fast weights, then (update=True) take one clipped SGD step.

    fast: name -> (B, ...) fast weights (must be in the autograd graph when update=True);
    kv: committed pre-RoPE caches of the TTT blocks (positions before this chunk), or ``CacheWindow``s holding
        them in place (the graphed step, ``ttt/graphs.py``);
    h: (B, n, d) suffix input of the chunk; targets: (B, n) the next token of every input.
    """
    cfg = model.cfg
    x, chunk_kv = model.run_blocks(h, range(cfg.n_prefix_layers, cfg.n_layers), kv, backend, fast)
    fused = HEAD_FUSED and not create_graph and fused_enabled(x)
    logits, nll = head_nll(model, x, targets, fused=fused, second_order=create_graph)
    nll, loss = masked_chunk_loss(nll, targets, cfg.bos_id)
    if update:
        names = list(fast)
        grads = torch.autograd.grad(loss.sum(), [fast[n] for n in names], create_graph=create_graph)
        fast = sgd_step(fast, list(grads), lr, cfg.ttt_clip)
    return ChunkOut(logits, nll, loss, fast, chunk_kv)


def chunk_update(
    model: TTTModel,
    fast: dict[str, torch.Tensor],
    committed: list[KV],
    h: torch.Tensor,
    targets: torch.Tensor,
    backend: str,
) -> tuple[dict[str, torch.Tensor], list[KV], torch.Tensor, torch.Tensor]:
    """Prefill's eager step for one whole chunk: (W_i, the caches with the chunk appended, the last input's
    logits (B, V), the chunk's NLL (B, b)), all detached; logits and NLL are scored with W_{i-1}. (The graphed
    step, ``ttt.graphs.ChunkStepGraph._step``, updates its buffers in place instead.)"""
    with torch.enable_grad():
        f = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
        out = suffix_chunk_step(model, f, committed, h, targets, lr=model.cfg.ttt_lr, update=True,
                                create_graph=False, backend=backend)  # fmt: skip
    kv = _append_kv(committed, [(k.detach(), v.detach()) for k, v in out.kv], _cache_keep(model))
    new_fast = {k: v.detach() for k, v in out.fast.items()}
    return new_fast, kv, out.logits[:, -1].detach(), out.nll.detach()


def _keep_last(t: torch.Tensor, n: int | None) -> torch.Tensor:
    """Last n positions along dim 2 (None = all)."""
    return t if n is None or t.shape[2] <= n else t[:, :, t.shape[2] - n :]


def _append_kv(kv: list[KV], new: list[KV], keep: int | None) -> list[KV]:
    out = []
    for (k, v), (nk, nv) in zip(kv, new, strict=True):
        # only the cached positions that survive are copied (the cat would copy all, then drop some)
        drop = 0 if keep is None else max(0, min(k.shape[2], k.shape[2] + nk.shape[2] - keep))
        k, v = k[:, :, drop:], v[:, :, drop:]
        k2 = nk if k.shape[2] == 0 else torch.cat((k.to(nk.dtype), nk), 2)
        v2 = nv if v.shape[2] == 0 else torch.cat((v.to(nv.dtype), nv), 2)
        out.append((_keep_last(k2, keep), _keep_last(v2, keep)))
    return out


def _cache_keep(model: TTTModel) -> int | None:
    """Tokens a cache must keep: window - 1 (all any future query can see), or everything for full attention."""
    return None if model.cfg.window is None else model.cfg.window - 1


# ---- prefill (inference) ----------------------------------------------------------------------------
def check_state(model: TTTModel, state: TTTState, tokens: torch.Tensor) -> None:
    if not isinstance(state, TTTState):
        raise TypeError(f"state must be a TTTState, got {type(state).__name__}")
    sig = model.state_signature()
    if state.signature != sig:
        raise ValueError(f"state was made by another model config: state {state.signature} != model {sig}")
    if state.batch_size != tokens.shape[0]:
        raise ValueError(f"state holds {state.batch_size} sequences but tokens have batch {tokens.shape[0]}")


@torch.no_grad()
def prefill(
    model: TTTModel, tokens: torch.Tensor, state: TTTState | None = None, *, backend: str = "auto"
) -> PrefillOutput:
    """Read tokens (B, T) with test-time training, continuing from ``state`` (fresh when None).

    Returns ``PrefillOutput(token_nll (B, T), state, last_logits (B, V))``; the served parameters and the
    input state are never mutated. Works under ``torch.no_grad()`` and ``torch.inference_mode()``: the inner
    gradients enable autograd locally.
    """
    check_tokens(tokens, model.cfg)
    if torch.is_inference_mode_enabled():  # autograd cannot run on inference tensors: leave the mode locally
        with torch.inference_mode(False):
            st = None if state is None else _clone_out_of_inference(state)
            return prefill(model, tokens.clone(), st, backend=backend)
    state = model.init_state(tokens.shape[0], tokens.device) if state is None else state
    check_state(model, state, tokens)
    cfg, keep, n_pre = model.cfg, _cache_keep(model), model.cfg.n_prefix_layers
    B, T = tokens.shape
    h, new_kv = model.run_blocks(model.embed(tokens), range(n_pre), state.kv[:n_pre], backend, keep=keep)
    pre_kv = _append_kv(state.kv[:n_pre], new_kv, keep)
    nll = torch.zeros(B, T, device=tokens.device, dtype=torch.promote_types(h.dtype, torch.float32))
    if state.last_logits is not None:
        nll[:, 0] = F.cross_entropy(state.last_logits, tokens[:, 0], reduction="none")
    if cfg.n_ttt_layers == 0:
        for s in range(
            0, T - 1, HEAD_SLICE
        ):  # (B, slice, V) logits at a time: a 128K x 128K-vocab head is 64 GB
            e = min(s + HEAD_SLICE, T - 1)
            nll[:, s + 1 : e + 1] = token_nll(model.head(h[:, s:e]), tokens[:, s + 1 : e + 1])
        last = model.head(h[:, -1:])[:, 0]  # (B, V)
        new = TTTState(fast={}, kv=pre_kv, pending_h=state.pending_h, pending_tokens=state.pending_tokens,
                       last_logits=last, pos=state.pos + T, signature=state.signature)  # fmt: skip
        return PrefillOutput(nll, new, last)
    run = _SuffixRun(model, state, backend)
    t = 0
    while t < T:
        if run.n_pending == cfg.ttt_chunk:  # tokens[:, t] is the pending chunk's last target: update now
            run.commit(extra_h=h[:, :0], extra_tok=tokens[:, t : t + 1])
            continue
        take = min(cfg.ttt_chunk - run.n_pending, T - t)
        seg_h, seg_tok = h[:, t : t + take], tokens[:, t : t + take]
        if run.n_pending + take == cfg.ttt_chunk and t + take < T:  # chunk completes, its last target known
            last, seg_nll = run.commit(
                extra_h=seg_h, extra_tok=torch.cat((seg_tok, tokens[:, t + take : t + take + 1]), 1)
            )
            nll[:, t + 1 : t + 1 + take] = seg_nll  # the chunk step scored exactly these targets
            run.last_logits = last
            t += take
            continue
        logits = run.extend(seg_h, seg_tok)
        n_score = min(take, T - t - 1)  # logits[:, j] predicts tokens[:, t + j + 1]
        if n_score > 0:
            nll[:, t + 1 : t + 1 + n_score] = token_nll(
                logits[:, :n_score], tokens[:, t + 1 : t + 1 + n_score]
            )
        run.last_logits = logits[:, -1]
        t += take
    run.release_graph()
    new = TTTState(fast=run.fast, kv=pre_kv + run.kv, pending_h=run.pending_h, pending_tokens=run.pending_tok,
                   last_logits=run.last_logits, pos=state.pos + T, signature=state.signature)  # fmt: skip
    return PrefillOutput(nll, new.detach(), run.last_logits)


def _clone_out_of_inference(state: TTTState) -> TTTState:
    return state.clone() if any(t.is_inference() for t in state.tensors().values()) else state


class _SuffixRun:
    """Mutable working copy of the TTT-block part of a state during one prefill call."""

    def __init__(self, model: TTTModel, state: TTTState, backend: str) -> None:
        self.model, self.backend = model, backend
        self.fast = dict(state.fast)
        self.kv = list(state.kv[model.cfg.n_prefix_layers :])  # committed + pending positions
        self.pending_h, self.pending_tok = state.pending_h, state.pending_tokens
        self.last_logits = state.last_logits
        self.graph: Any = None  # ttt.graphs.ChunkStepGraph whose buffers hold fast/kv, while they do

    @property
    def n_pending(self) -> int:
        return self.pending_tok.shape[1]

    def extend(self, seg_h: torch.Tensor, seg_tok: torch.Tensor) -> torch.Tensor:
        """Score new inputs of the pending chunk with the current fast weights (no update yet)."""
        m = self.model
        x, new_kv = m.run_blocks(
            seg_h, range(m.cfg.n_prefix_layers, m.cfg.n_layers), self.kv, self.backend, self.fast
        )
        keep = None if m.cfg.window is None else m.cfg.window - 1 + self.n_pending + seg_h.shape[1]
        self.kv = _append_kv(self.kv, new_kv, keep)
        self.pending_h = torch.cat((self.pending_h, seg_h.to(self.pending_h.dtype)), 1)
        self.pending_tok = torch.cat((self.pending_tok, seg_tok), 1)
        return m.head(x)

    def commit(self, extra_h: torch.Tensor, extra_tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Complete the pending chunk with extra inputs (+ the final target), take its SGD step.

        extra_tok holds the tokens of extra_h followed by one more token (the chunk's last target).
        Returns the last input's logits (B, V) and the extra inputs' NLL (B, n), scored with the pre-update
        weights.
        """
        m, n_pend = self.model, self.n_pending
        committed = [(k[:, :, : k.shape[2] - n_pend], v[:, :, : v.shape[2] - n_pend]) for k, v in self.kv]
        h = torch.cat((self.pending_h, extra_h.to(self.pending_h.dtype)), 1)  # (B, b, d)
        targets = torch.cat((self.pending_tok, extra_tok), 1)[:, 1:]  # (B, b): the next token of every input
        if self._graph_ready(n_pend, committed, h):
            from ttt.graphs import chunk_graph

            # the run's own graph while it holds the state: parameters cannot move mid-prefill, so the cache
            # lookup (and its check of the parameter addresses) is needed once per prefill, not per chunk
            g = self.graph or chunk_graph(m, self.fast, committed, h, self.backend)
            last, nll = g.run(self.fast, committed, h, targets)
            self.graph, self.fast, self.kv = g, g.fast, g.kv
            self.pending_h, self.pending_tok = h[:, :0], targets[:, :0]
            return last.clone(), nll.clone()
        self.release_graph()
        self.fast, self.kv, last, nll = chunk_update(m, self.fast, committed, h, targets, self.backend)
        self.pending_h, self.pending_tok = h[:, :0], targets[:, :0]
        return last, nll[:, n_pend:]

    def _graph_ready(self, n_pend: int, committed: list[KV], h: torch.Tensor) -> bool:
        """A whole chunk on CUDA with full caches (or caches still filling up, when the step's attention takes a
        device-side first key: ``graphs.masked_steps``) and nothing pending: the captured step applies."""
        from ttt import graphs

        w = self.model.cfg.window
        if not (CHUNK_GRAPHS and graphs.supported(h) and w is not None and n_pend == 0):
            return False
        if h.shape[1] != self.model.cfg.ttt_chunk:
            return False
        if all(k.shape[2] == w - 1 for k, _ in committed):
            return True
        m = committed[0][0].shape[2]
        return (
            all(k.shape[2] == m for k, _ in committed)
            and m < w - 1
            and graphs.masked_steps(self.model, h, self.backend)
        )

    def release_graph(self) -> None:
        """Copy whatever still lives in the graph's buffers out of them (the next replay overwrites them)."""
        g = self.graph
        if g is None:
            return
        self.fast = {k: w.clone() if g.owns(w) else w for k, w in self.fast.items()}
        self.kv = [(k.clone(), v.clone()) if g.owns(k) or g.owns(v) else (k, v) for k, v in self.kv]
        self.graph = None


# ---- meta_loss (training) ---------------------------------------------------------------------------
# attention of the TTT blocks inside meta_loss, which differentiates it twice: "auto" = "triton2" (fused, its
# backward differentiable again, ``ttt/triton_band2.py``) on CUDA in half precision or under autocast, else "math"
# (explicit, any order; the CPU path and its float64 tests)
META_BACKEND = "auto"


def meta_backend(h: torch.Tensor, head_dim: int) -> str:
    """The attention backend ``meta_loss`` runs for suffix input h (``META_BACKEND`` resolved)."""
    if META_BACKEND != "auto":
        return META_BACKEND
    from ttt import triton_band2

    half = h.dtype in (torch.float16, torch.bfloat16) or (h.is_cuda and torch.is_autocast_enabled("cuda"))
    return "triton2" if half and triton_band2.usable(h, head_dim) else "math"


def meta_loss(
    model: TTTModel, tokens: torch.Tensor, *, checkpoint: bool = False, ilr_scale: float = 1.0
) -> torch.Tensor:
    """Mean over chunks of each chunk's mean next-token CE scored with W_{i-1}; second order throughout.

    tokens (B, T+1): inputs tokens[:, :-1], targets tokens[:, 1:] (a tail chunk shorter than b counts as one
    chunk). Each inner step uses ``autograd.grad(create_graph=True)``; the step after the last chunk is not
    taken (never used). ``checkpoint=True`` recomputes each chunk in backward
    (``torch.utils.checkpoint(use_reentrant=False)``): same gradients, memory of one chunk's activations.
    ``ilr_scale`` multiplies ttt_lr (the official inner-lr warm-up ramps it 0.1 -> 1).
    """
    check_tokens(tokens, model.cfg, min_len=2)
    # the inner steps need autograd even when the caller evaluates under no_grad
    with torch.enable_grad():
        return _meta_loss(model, tokens, checkpoint, ilr_scale)


def _unfused_twice() -> tuple:
    """Checkpoint contexts: the recomputation (in backward, maybe on another thread) stays eager too."""
    return unfused(), unfused()


def _meta_loss(model: TTTModel, tokens: torch.Tensor, checkpoint: bool, ilr_scale: float) -> torch.Tensor:
    cfg = model.cfg
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    B, T = inputs.shape
    # the prefix, once. Its compiled elementwise kernels (CUDA) are first order, and first order is all the prefix
    # needs: the inner gradients (to the fast weights) never reach back into it, so only the outer backward runs
    # through it. The suffix runs ``unfused``: the first-order compiled kernels have no double backward; its norms,
    # RoPE and SwiGLU gates run ``ttt.ops2``'s twice-differentiable passes instead.
    h, _ = model.run_blocks(model.embed(inputs), range(cfg.n_prefix_layers), None, "auto")
    with unfused():
        return _meta_suffix(model, h, targets, checkpoint, ilr_scale)


def _meta_suffix(
    model: TTTModel, h: torch.Tensor, targets: torch.Tensor, checkpoint: bool, ilr_scale: float
) -> torch.Tensor:
    """meta_loss over the suffix blocks, from the prefix output h (B, T, d)."""
    cfg = model.cfg
    B, T = targets.shape
    if cfg.n_ttt_layers == 0:
        b = cfg.ttt_chunk
        per_chunk = [
            chunk_loss(model.head(h[:, s : s + b]), targets[:, s : s + b], cfg.bos_id)[1]
            for s in range(0, T, b)
        ]
        return torch.stack(per_chunk).mean()
    fast = model.initial_fast(B)
    kv: list[KV] = [(h.new_zeros(B, cfg.n_kv_heads, 0, cfg.head_dim),) * 2 for _ in range(cfg.n_ttt_layers)]
    losses = []
    starts = list(range(0, T, cfg.ttt_chunk))
    backend = meta_backend(h, cfg.head_dim)
    for s in starts:
        args = (model, fast, kv, h[:, s : s + cfg.ttt_chunk], targets[:, s : s + cfg.ttt_chunk])
        kw = dict(lr=cfg.ttt_lr * ilr_scale, update=s != starts[-1], create_graph=True, backend=backend)
        out = (
            _checkpoint(suffix_chunk_step, *args, use_reentrant=False, context_fn=_unfused_twice, **kw)
            if checkpoint
            else suffix_chunk_step(*args, **kw)
        )
        losses.append(out.loss)  # (B,)
        fast, kv = out.fast, _append_kv(kv, out.kv, _cache_keep(model))
    return torch.stack(losses).mean()
