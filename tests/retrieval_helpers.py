"""Test helpers for retrieval tests: a deterministic hashing embedder (no model download, exact math)."""

from __future__ import annotations

import hashlib

import numpy as np

from retrieval.tokenize import tokenize


class HashEmbedder:
    """Bag-of-words random projection: each token adds a fixed +-1 pattern; rows L2-normalised."""

    dim = 64
    name = "hash-64"

    def __init__(self) -> None:
        self.calls = 0

    def _vec(self, tok: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little")
        return np.random.default_rng(seed).choice([-1.0, 1.0], size=self.dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim))
        for i, t in enumerate(texts):
            for tok in tokenize(t):
                out[i] += self._vec(tok)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.where(norms == 0, 1, norms)).astype(np.float32)
