"""Fast decoding: preallocated ring-buffer KV caches, one dedicated per-token step, CUDA graphs.

``DecodeSession(model, state)`` continues a sequence that ``prefill`` has read, one token per ``step``, with
exactly the semantics of feeding each token through ``prefill`` (``ttt/inner.py``'s streaming rule; the test
``tests/test_decode.py`` checks logits and greedy tokens against that path), but without its per-token costs
(concatenating and re-rotating the window cache every token, one kernel launch per op):

- every layer keeps a ring of ``window`` slots holding post-RoPE keys and values at *absolute* positions
  (RoPE angles are computed in float64, so positions up to millions stay exact; attention only depends on
  offsets, so the slot order does not matter); full attention (``window=None``) keeps a linear buffer;
- TTT blocks also keep their pre-RoPE keys, and a snapshot of the ``window - 1`` committed positions before
  the current chunk: once ``b`` tokens of a chunk and the token after them exist, the chunk's SGD step runs
  through ``ttt.inner.suffix_chunk_step`` (same function as prefill) and the new fast weights are copied into
  the session's buffers (fp32 master + a compute-dtype copy for the per-token matmuls);
- on CUDA, once the rings are full the per-token step has static shapes and addresses and is captured in a
  CUDA graph (``cuda_graph=True``); the TTT step every ``b`` tokens runs eagerly between replays; full
  attention attends over its whole preallocated buffer with an on-device mask of the filled slots, so its
  step is graphed from the first token (eager, host work was ~90% of its per-token time on the H100: 50 ms);
- one query over a cache whose length changes every step runs on the flash / memory-efficient SDPA kernels,
  never cuDNN: cuDNN builds an execution plan per new key length (the 3b full-attention decode measured
  81-89 ms per token, flat from 8K to 128K context, on the H100 with SDPA's default choice: per-step set-up, not
  arithmetic; pinned, the eager step still took ~50 ms of host work, hence the graphed full-attention step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttt.inner import check_state, suffix_chunk_step
from ttt.model import KV, Block, TTTModel, add_post, rope_rotate, swiglu_batched
from ttt.state import TTTState

# SDPA backends of the per-token attention on CUDA (module doc: cuDNN re-plans for every cache length)
DECODE_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


# decode attention kernel: "auto" = our split-KV Triton kernel (``ttt/triton_decode.py``) where it runs (CUDA), else
# SDPA; "sdpa" = SDPA always (on CUDA without cuDNN)
DECODE_KERNEL = "auto"


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gqa: bool,
    valid: torch.Tensor | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """Attention of (B, H, 1, D) queries over cached keys (B, Hkv, n, D).

    ``valid`` (n,) bool: which slots hold a key (a static full-attention buffer, filled up to the current
    position); None = every slot. ``kernel`` (default ``DECODE_KERNEL``): ``"auto"`` runs the split-KV Triton
    kernel on CUDA, else SDPA; ``"sdpa"``: SDPA (masked calls run the memory-efficient kernel: flash takes no mask).
    """
    kernel = kernel or DECODE_KERNEL
    assert kernel in ("auto", "sdpa"), f"decode kernel must be 'auto' or 'sdpa', got {kernel!r}"
    if kernel == "auto":
        from ttt import triton_decode

        if triton_decode.usable(q):
            return triton_decode.split_kv_attention(q, k, v, valid)
    mask = None if valid is None else valid.view(1, 1, 1, -1)
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, b) for b in DECODE_SDPA_BACKENDS]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def masked_math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """One query per row over a static buffer, as two batched GEMVs and a masked fp32 softmax.

    q (B, H, 1, D), k/v (B, Hkv, n, D), valid (n,) bool -> (B, H, 1, D). Reads each cached key and value once
    at full memory bandwidth (cuBLAS), the alternative full-attention decode the benchmark times as well.
    """
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, H // Hkv, D)  # the query heads sharing one key head side by side
    scores = (qg @ k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32))  # (B, Hkv, H/Hkv, n)
    scores = scores * D**-0.5
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).to(v.dtype)
    return (probs @ v).view(B, H, 1, D)


def rope_cos_sin(pos: torch.Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos/sin (n, D/2) of absolute positions pos (n,), computed in float64 (exact up to millions)."""
    inv = theta ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float64) / dim)
    ang = pos.to(torch.float64)[:, None] * inv[None, :]  # (n, D/2)
    return ang.cos().to(dtype), ang.sin().to(dtype)


class DecodeSession:
    """Per-token decoding from a prefilled state. ``step(tokens (B,)) -> logits (B, V)`` (fp32)."""

    def __init__(
        self,
        model: TTTModel,
        state: TTTState,
        *,
        max_new_tokens: int = 0,
        cuda_graph: bool = True,
        consume_state: bool = False,
        fa_attention: str = "auto",
    ) -> None:
        """``max_new_tokens`` sizes the full-attention buffer; ``consume_state=True`` frees each layer's cache
        in ``state`` once copied (a 128K full-attention cache would otherwise be held twice).

        Full attention on CUDA attends over its whole static buffer with an on-device mask of the filled
        slots, so its per-token step is one CUDA graph too; ``fa_attention`` picks that masked kernel:
        ``"auto"`` (``decode_attention``'s default: the split-KV Triton kernel on CUDA), ``"sdpa"``
        (memory-efficient SDPA) or ``"math"`` (``masked_math_attention``)."""
        assert fa_attention in ("auto", "sdpa", "math"), (
            f"fa_attention must be 'auto', 'sdpa' or 'math', got {fa_attention!r}"
        )
        cfg = model.cfg
        assert state.pos > 0 and state.last_logits is not None, "DecodeSession needs a state that read tokens"
        check_state(model, state, state.pending_tokens)
        self.model, self.cfg = model, cfg
        self.B, self.pos = state.batch_size, state.pos  # pos = index of the next token to feed
        dev = model.tok_emb.weight.device
        self.dtype = model.tok_emb.weight.dtype
        self.rope_dtype = torch.promote_types(self.dtype, torch.float32)
        self.slots = cfg.window if cfg.window is not None else state.pos + max_new_tokens + 1
        self.use_graph = cuda_graph and dev.type == "cuda"
        self.fa_attention = fa_attention
        self.slot_ids = torch.arange(self.slots, device=dev)  # full attention: slot j holds position j
        self._graph: torch.cuda.CUDAGraph | None = None
        self.fast = {k: v.clone() for k, v in state.fast.items()}  # fp32 master copies
        self.fast_lp = {k: v.to(self.dtype) for k, v in self.fast.items()}  # compute-dtype copies
        self.pending_h = torch.zeros(self.B, cfg.ttt_chunk, cfg.d_model, device=dev, dtype=self.dtype)
        self.pending_tok = torch.zeros(self.B, cfg.ttt_chunk + 1, dtype=torch.long, device=dev)
        self.n_pend = state.n_pending
        self.pending_h[:, : self.n_pend] = state.pending_h
        self.pending_tok[:, : self.n_pend] = state.pending_tokens
        self._fill_caches(state, dev, consume_state)
        # static inputs of the per-token step (filled before every eager call or graph replay)
        self.tok_buf = torch.zeros(self.B, dtype=torch.long, device=dev)
        self.pos_buf = torch.zeros(1, dtype=torch.long, device=dev)
        self.pend_idx = torch.zeros(1, dtype=torch.long, device=dev)

    # ---- set-up -------------------------------------------------------------------------------------
    def _fill_caches(self, state: TTTState, dev: torch.device, consume: bool) -> None:
        cfg, n_pre = self.cfg, self.cfg.n_prefix_layers
        shape = (self.B, cfg.n_kv_heads, self.slots, cfg.head_dim)
        self.k: list[torch.Tensor] = []  # allocated layer by layer (with consume, the peak is one layer over)
        self.v: list[torch.Tensor] = []
        self.k_pre: list[torch.Tensor] = []
        self.snap: list[KV] = []  # TTT blocks: pre-RoPE committed (k, v) before the pending chunk
        for i in range(len(state.kv)):  # by index: consume=True frees each layer before the next
            k, v = state.kv[i]
            L = k.shape[2]
            self.k.append(torch.zeros(shape, device=dev, dtype=self.dtype))
            self.v.append(torch.zeros(shape, device=dev, dtype=self.dtype))
            if i >= n_pre:
                self.k_pre.append(torch.zeros(shape, device=dev, dtype=self.dtype))
            n = min(L, self.slots)  # TTT blocks may hold window-1 committed + pending: keep the last window
            pos = torch.arange(self.pos - n, self.pos, device=dev)
            cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, self.rope_dtype)
            slot = pos % self.slots
            self.k[i][:, :, slot] = rope_rotate(k[:, :, L - n :], cos, sin, cfg.rope_interleaved).to(
                self.dtype
            )
            self.v[i][:, :, slot] = v[:, :, L - n :].to(self.dtype)
            if i >= n_pre:
                self.k_pre[i - n_pre][:, :, slot] = k[:, :, L - n :].to(self.dtype)
                n_com = L - self.n_pend
                self.snap.append((k[:, :, :n_com].to(self.dtype), v[:, :, :n_com].to(self.dtype)))
            if consume:
                empty = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3])
                state.kv[i] = (empty, empty)
            del k, v

    @property
    def n_valid(self) -> int:
        """Cache slots holding a visible key for the next token (the token itself included)."""
        return min(self.pos + 1, self.slots)

    # ---- the per-token step -------------------------------------------------------------------------
    def _attend(
        self, blk: Block, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Attention of one token x (B, 1, d) at position pos_buf; writes its k/v into the ring."""
        cfg, a = self.cfg, blk.attn
        B = x.shape[0]
        q = a.q_norm(a.wq(x).view(B, 1, cfg.n_heads, cfg.head_dim).transpose(1, 2))  # (B, H, 1, D)
        k = a.k_norm(a.wk(x).view(B, 1, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2))  # (B, Hkv, 1, D)
        v = a.wv(x).view(B, 1, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        slot = self.pos_buf % self.slots  # (1,) on device: graph-safe indexing
        self.k[i].index_copy_(2, slot, rope_rotate(k, cos, sin, cfg.rope_interleaved))
        self.v[i].index_copy_(2, slot, v)
        if i >= cfg.n_prefix_layers:
            self.k_pre[i - cfg.n_prefix_layers].index_copy_(2, slot, k)
        q = rope_rotate(q, cos, sin, cfg.rope_interleaved)
        gqa = cfg.n_kv_heads != cfg.n_heads
        if cfg.window is None and self.use_graph:  # static buffer, filled slots masked on the device
            valid = self.slot_ids <= self.pos_buf  # (slots,)
            if self.fa_attention == "math":
                o = masked_math_attention(q, self.k[i], self.v[i], valid)
            else:
                o = decode_attention(q, self.k[i], self.v[i], gqa, valid, kernel=self.fa_attention)
        else:
            n = self.n_valid  # host int: == slots (static) once the ring is full
            # every cached slot is visible (the ring holds exactly the window)
            o = decode_attention(q, self.k[i][:, :, :n], self.v[i][:, :, :n], gqa)  # (B, H, 1, D)
        return a.wo(o.transpose(1, 2).reshape(B, 1, -1))

    def _forward_token(self) -> torch.Tensor:
        """tok_buf at pos_buf -> logits (B, V); records the suffix input in the pending chunk buffer."""
        cfg, m = self.cfg, self.model
        cos, sin = rope_cos_sin(self.pos_buf, cfg.head_dim, cfg.rope_theta, self.rope_dtype)  # (1, D/2)
        h = m.embed(self.tok_buf[:, None])  # (B, 1, d)
        for i, blk in enumerate(m.blocks):
            if i == cfg.n_prefix_layers:
                self.pending_h.index_copy_(1, self.pend_idx, h)
            h = add_post(h, self._attend(blk, i, blk.attn_norm(h), cos, sin), blk.attn_post)
            if blk.has_prime:
                p = blk.prime_norm(h)
                h = add_post(h, swiglu_batched(p, m.block_fast(self.fast_lp, i)), blk.prime_post)
            h = add_post(h, blk.mlp(blk.mlp_norm(h)), blk.mlp_post)
        return m.head(h)[:, 0]  # (B, V) fp32

    # ---- the TTT step every b tokens ------------------------------------------------------------------
    def _ttt_step(self, next_tok: torch.Tensor) -> None:
        """The pending chunk is full and its last target (next_tok) known: one SGD step, as in prefill."""
        cfg, m, b = self.cfg, self.model, self.cfg.ttt_chunk
        targets = torch.cat((self.pending_tok[:, 1:b], next_tok[:, None]), 1)  # (B, b)
        with torch.inference_mode(False), torch.enable_grad():
            fast = {k: v.clone().requires_grad_(True) for k, v in self.fast.items()}
            snap = [(k.clone(), v.clone()) for k, v in self.snap]  # (no inference tensors in the graph)
            out = suffix_chunk_step(m, fast, snap, self.pending_h.clone(), targets.clone(),
                                    lr=cfg.ttt_lr, update=True, create_graph=False, backend="auto")  # fmt: skip
        for k, w in out.fast.items():
            self.fast[k].copy_(w.detach())
            self.fast_lp[k].copy_(w.detach())
        # committed positions before the next chunk: the last window-1 tokens, all in the ring right now
        n_com = self.pos if cfg.window is None else min(cfg.window - 1, self.pos)
        slots = torch.arange(self.pos - n_com, self.pos, device=self.pos_buf.device) % self.slots
        self.snap = [
            (self.k_pre[j][:, :, slots], self.v[cfg.n_prefix_layers + j][:, :, slots])
            for j in range(cfg.n_ttt_layers)
        ]
        self.n_pend = 0

    # ---- public -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens (B,) at the next position; returns the next-token logits (B, V) fp32."""
        assert tokens.shape == (self.B,), f"expected ({self.B},) token ids, got {tuple(tokens.shape)}"
        cfg = self.cfg
        if cfg.n_ttt_layers and self.n_pend == cfg.ttt_chunk:
            self._ttt_step(tokens)
        assert self.pos < self.slots or cfg.window is not None, "full-attention buffer is full"
        self.tok_buf.copy_(tokens)
        self.pos_buf.fill_(self.pos)
        if cfg.n_ttt_layers:
            self.pend_idx.fill_(self.n_pend)
            self.pending_tok[:, self.n_pend] = tokens
        if self.use_graph and (cfg.window is None or self.pos + 1 >= self.slots):
            logits = self._replay()
        else:
            logits = self._forward_token()
        self.pos += 1
        self.n_pend += 1 if cfg.n_ttt_layers else 0
        return logits.clone()

    def _replay(self) -> torch.Tensor:
        """Run the per-token step through a CUDA graph (captured on first use: ring full, or full attention)."""
        if self._graph is None:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up outside capture (allocator, cuBLAS workspaces); idempotent
                self._forward_token()
            torch.cuda.current_stream().wait_stream(s)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graph_out = self._forward_token()
        self._graph.replay()
        return self._graph_out
