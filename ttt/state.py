"""TTTState: everything that changes while a model reads a sequence (passed in and returned, never stored).

Contents, for a batch of B sequences that have all consumed ``pos`` tokens:

- ``fast``: the prime-MLP weights W_i of every TTT block, fp32, one copy per row: name -> (B, out, in).
- ``kv``: per block, the pre-RoPE (post k-norm) keys and values, each (B, Hkv, L, D):
  prefix blocks keep the last ``window - 1`` tokens (all any future query can see);
  TTT blocks keep the last ``window - 1`` *committed* tokens (positions before the pending chunk) followed by
  the ``n_pending`` tokens of the pending chunk. With ``window=None`` (full attention) nothing is dropped.
- ``pending_h`` (B, n_pending, d) and ``pending_tokens`` (B, n_pending): inputs of the current TTT chunk whose
  update has not happened yet (suffix-input hidden states and their token ids). A chunk of ``b`` inputs is
  updated as soon as the token after its last input is known (that token is its last target), so
  ``1 <= n_pending <= b`` once any token was read.
- ``last_logits`` (B, V) fp32: the model's prediction for the next token (None before any token).

Size is independent of how many tokens were read (except ``window=None``, where the KV cache grows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(kw_only=True)
class TTTState:
    fast: dict[str, torch.Tensor]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    pending_h: torch.Tensor
    pending_tokens: torch.Tensor
    last_logits: torch.Tensor | None = None
    pos: int = 0
    signature: dict[str, Any] = field(default_factory=dict)  # shape facts of the config that made it

    @property
    def batch_size(self) -> int:
        return self.pending_tokens.shape[0]

    @property
    def n_pending(self) -> int:
        return self.pending_tokens.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor view of the state (the safetensors layout)."""
        out = {f"fast.{k}": v for k, v in self.fast.items()}
        for i, (k, v) in enumerate(self.kv):
            out[f"kv.{i}.k"], out[f"kv.{i}.v"] = k, v
        out["pending_h"], out["pending_tokens"] = self.pending_h, self.pending_tokens
        if self.last_logits is not None:
            out["last_logits"] = self.last_logits
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def clone(self) -> TTTState:
        return TTTState(
            fast={k: v.clone() for k, v in self.fast.items()},
            kv=[(k.clone(), v.clone()) for k, v in self.kv],
            pending_h=self.pending_h.clone(),
            pending_tokens=self.pending_tokens.clone(),
            last_logits=None if self.last_logits is None else self.last_logits.clone(),
            pos=self.pos,
            signature=dict(self.signature),
        )

    def detach(self) -> TTTState:
        """Same state with every tensor cut from the autograd graph."""
        return TTTState(
            fast={k: v.detach() for k, v in self.fast.items()},
            kv=[(k.detach(), v.detach()) for k, v in self.kv],
            pending_h=self.pending_h.detach(),
            pending_tokens=self.pending_tokens,
            last_logits=None if self.last_logits is None else self.last_logits.detach(),
            pos=self.pos,
            signature=self.signature,
        )

    def to(self, device: torch.device | str) -> TTTState:
        s = self.clone()
        s.fast = {k: v.to(device) for k, v in s.fast.items()}
        s.kv = [(k.to(device), v.to(device)) for k, v in s.kv]
        s.pending_h, s.pending_tokens = s.pending_h.to(device), s.pending_tokens.to(device)
        s.last_logits = None if s.last_logits is None else s.last_logits.to(device)
        return s

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"pos": str(self.pos), "signature": json.dumps(self.signature), "n_kv": str(len(self.kv))}
        save_file({k: v.detach().contiguous() for k, v in self.tensors().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> TTTState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if "pos" not in meta or "n_kv" not in meta:
                raise ValueError(f"{path} is not a TTTState file (metadata {sorted(meta)})")
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        n_kv = int(meta["n_kv"])
        return cls(
            fast={k[len("fast.") :]: v for k, v in t.items() if k.startswith("fast.")},
            kv=[(t[f"kv.{i}.k"], t[f"kv.{i}.v"]) for i in range(n_kv)],
            pending_h=t["pending_h"],
            pending_tokens=t["pending_tokens"],
            last_logits=t.get("last_logits"),
            pos=int(meta["pos"]),
            signature=json.loads(meta["signature"]),
        )
