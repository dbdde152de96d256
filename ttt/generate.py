"""Decoding with the SWA KV cache and the current fast weights; TTT continues during generation.

The streaming rule of ``ttt/inner.py`` applies unchanged: once b inputs of a chunk and the token after them
exist, the chunk's SGD step runs (self-training on the model's own samples, paper §2.3.2) and decoding
continues with W_i. Two interchangeable decoders (``decoder=``):

- ``"prefill"``: every generated token is fed back through ``prefill`` (the reference; simple, slow);
- ``"session"``: ``ttt.decode.DecodeSession``, ring-buffer caches and a dedicated per-token step (CUDA
  graphs on GPU); equal to the reference up to float rounding (``tests/test_decode.py``);
- ``"auto"`` (default): the session on CUDA, the reference on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from ttt.model import TTTModel
from ttt.state import TTTState


class TokenConstraint(Protocol):
    """Constrained decoding of one sequence: ``mask()`` (V,) bool of the tokens allowed next, then
    ``advance(token)`` with the token chosen (e.g. ``hybrid.extractive.ValueCopy``)."""

    def mask(self) -> torch.Tensor: ...

    def advance(self, token: int) -> None: ...


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 = greedy; else softmax(logits / T) truncated to top_p."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Stream:
    """One batch of sequences being decoded: its next-token ``logits`` (B, V), advanced one token at a time."""

    def __init__(
        self, model: TTTModel, prompt: torch.Tensor | None, state: TTTState | None, decoder: str, n_new: int
    ) -> None:
        if prompt is not None and prompt.numel() > 0:
            out = model.prefill(prompt, state)
            state, self.logits = out.state, out.last_logits
        elif state is not None and state.last_logits is not None:
            self.logits = state.last_logits
        else:
            raise ValueError("generate needs a non-empty prompt (B, T) or a state that has read tokens")
        self.model, self.state = model, state
        if decoder == "auto":
            decoder = "session" if self.logits.is_cuda else "prefill"
        self.session = None
        if decoder == "session" and n_new > 1:
            from ttt.decode import DecodeSession

            self.session = DecodeSession(model, state, max_new_tokens=n_new)  # type: ignore[arg-type]

    def step(self, tok: torch.Tensor) -> None:
        if self.session is not None:
            self.logits = self.session.step(tok)
        else:
            out = self.model.prefill(tok[:, None], self.state)
            self.state, self.logits = out.state, out.last_logits


@torch.no_grad()
def generate_iter(
    model: TTTModel,
    prompt: torch.Tensor | None,
    state: TTTState | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    decoder: str = "auto",
    constraint: TokenConstraint | None = None,
    contrast_prompt: torch.Tensor | None = None,
    contrast_alpha: float = 0.0,
) -> Iterator[torch.Tensor]:
    """Yield (B,) next tokens one step at a time. A row that emitted ``eos_id`` keeps emitting it; the loop
    stops when every row has. ``prompt`` may be None/empty when ``state`` already read some tokens.
    ``constraint`` (batch 1) masks the logits before every choice. ``contrast_prompt`` (B, T') with
    ``contrast_alpha`` a > 0: context-aware decoding (Shi et al. 2023), choices from (1 + a) * logits - a *
    the logits of the same continuation after ``contrast_prompt`` (e.g. the question without its sources),
    which discounts what the model would say without the context. The caller's ``state`` is not modified."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if decoder not in ("auto", "prefill", "session"):
        raise ValueError(f"decoder must be 'auto', 'prefill' or 'session', got {decoder!r}")
    if contrast_alpha < 0:
        raise ValueError(f"contrast_alpha must be >= 0, got {contrast_alpha}")
    main = _Stream(model, prompt, state, decoder, max_new_tokens)
    ref = None
    if contrast_prompt is not None and contrast_alpha > 0:
        ref = _Stream(model, contrast_prompt, None, decoder, max_new_tokens)
        assert ref.logits.shape == main.logits.shape, "the contrast prompt needs the prompt's batch size"
    B = main.logits.shape[0]
    if constraint is not None and B != 1:
        raise ValueError(f"a token constraint decodes one sequence at a time, got batch {B}")
    done = torch.zeros(B, dtype=torch.bool, device=main.logits.device)
    for step in range(max_new_tokens):
        logits = main.logits
        if ref is not None:
            logits = (1 + contrast_alpha) * logits - contrast_alpha * ref.logits
        if constraint is not None:
            logits = logits.masked_fill(~constraint.mask().to(logits.device)[None, :], float("-inf"))
        tok = sample_next(logits, temperature, top_p, generator)
        if constraint is not None:
            constraint.advance(int(tok[0]))
        if eos_id is not None:
            tok = torch.where(done, torch.full_like(tok, eos_id), tok)
            done = done | (tok == eos_id)
        yield tok
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        main.step(tok)
        if ref is not None:
            ref.step(tok)


def generate(
    model: TTTModel, prompt: torch.Tensor | None, state: TTTState | None = None, **kw: object
) -> torch.Tensor:
    """All of ``generate_iter`` stacked: (B, n_new) with n_new <= max_new_tokens."""
    toks = list(generate_iter(model, prompt, state, **kw))  # type: ignore[arg-type]
    if not toks:
        B = prompt.shape[0] if prompt is not None else state.batch_size  # type: ignore[union-attr]
        return torch.zeros(B, 0, dtype=torch.long)
    return torch.stack(toks, dim=1)
