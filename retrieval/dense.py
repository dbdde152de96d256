"""Dense vector index: FAISS ``IndexIDMap(IndexFlatIP)`` by default (exact cosine on unit vectors).

Options for large corpora: ``kind="hnsw"`` (IndexHNSWFlat, CPU, no native delete: rebuilt from the
stored vectors) and ``kind="ivf"`` (IndexIVFFlat, trained on the first vectors added, needs
>= ``ivf_nlist`` of them). GPU: faiss-gpu when its symbols exist and a GPU is visible, otherwise a torch
matmul top-k on CUDA (``backend="torch"`` forces it, on any device). The unit vectors are kept
row-aligned with the chunk table (``dense_vectors.npy``) so any index kind can be rebuilt and a hit's
dense score can be computed for chunks another retriever found.

Without faiss (``import faiss`` fails, e.g. on a GPU box that lacks it) every kind becomes an exact flat
inner-product search over those stored vectors: torch matmul + top-k on ``DenseConfig.device`` (numpy when
torch is absent too). The store keeps the same files; ``dense.faiss`` is simply not written, and a process
that has faiss rebuilds its index from ``dense_vectors.npy`` when that file is missing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptIndexError

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivf")
BACKENDS = ("auto", "faiss", "torch")


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "dense retrieval needs faiss: pip install 'ttt-rag[retrieval]' (or faiss-gpu)"
        ) from e
    return faiss


_HAS_FAISS: list[bool] = []  # cached result of the first import attempt


def faiss_available() -> bool:
    """True when ``import faiss`` works (checked once per process)."""
    if not _HAS_FAISS:
        try:
            import faiss  # noqa: F401
        except ImportError:
            log.warning("faiss is not installed: dense search falls back to an exact torch/numpy flat index")
            _HAS_FAISS.append(False)
        else:
            _HAS_FAISS.append(True)
    return _HAS_FAISS[0]


_THREADS_SET: list[int] = []  # the FAISS thread count this process last applied


def set_faiss_threads(n: int) -> None:
    """Apply ``DenseConfig.faiss_threads`` (0 = all cores) once per value; a process-wide setting."""
    n = n or (os.cpu_count() or 1)
    if _THREADS_SET != [n]:
        _faiss().omp_set_num_threads(n)
        _THREADS_SET[:] = [n]


def faiss_gpu_available() -> bool:
    if not faiss_available():
        return False
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass(kw_only=True, frozen=True)
class DenseConfig:
    kind: str = "flat"  # one of KINDS
    hnsw_m: int = 32  # HNSW graph degree
    hnsw_ef_search: int = 128  # HNSW search beam
    ivf_nlist: int = 1024  # IVF cells
    ivf_nprobe: int = 32  # IVF cells visited per query
    backend: str = "auto"  # auto: faiss (GPU if faiss-gpu) or torch matmul on CUDA; see BACKENDS
    device: str | None = None  # torch backend device; None = cuda if available else cpu
    # FAISS CPU OpenMP threads (process-global). 1 by default: idle OpenMP threads spin and starve torch in
    # the same process (hybrid measured generate 12.9 s -> 0.33 s on the 2-core box). 0 = all cores.
    faiss_threads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown dense index kind {self.kind!r}; choose from {KINDS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown dense backend {self.backend!r}; choose from {BACKENDS}")


class DenseIndex:
    """Unit vectors ``(N, dim)`` row-aligned with chunks, int64 ids, and a FAISS index over them."""

    def __init__(self, cfg: DenseConfig, dim: int, vectors: np.ndarray, ids: np.ndarray, index=None) -> None:
        assert vectors.shape == (len(ids), dim), f"vectors {vectors.shape} vs {len(ids)} ids of dim {dim}"
        self.cfg, self.dim, self.vectors, self.ids = cfg, dim, vectors, np.asarray(ids, dtype=np.int64)
        self.index = index if index is not None else self._build(vectors, self.ids)
        self._order = np.argsort(self.ids, kind="stable")  # id -> row via searchsorted
        self._torch = None  # lazily moved copy of vectors for the torch backend
        self._gpu, self._gpu_res = None, None  # lazily made faiss-gpu copy of the index

    def _new_faiss(self, train: np.ndarray):
        faiss = _faiss()
        if self.cfg.kind == "flat":
            return faiss.IndexIDMap(faiss.IndexFlatIP(self.dim))
        if self.cfg.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = self.cfg.hnsw_ef_search
            return faiss.IndexIDMap(inner)
        quant = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quant, self.dim, self.cfg.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
        if len(train) < self.cfg.ivf_nlist:
            raise ValueError(
                f"IVF needs >= ivf_nlist={self.cfg.ivf_nlist} vectors to train, got {len(train)}"
            )
        ivf.train(train)
        ivf.nprobe = self.cfg.ivf_nprobe
        return ivf  # IVF supports add_with_ids/remove_ids natively

    def _build(self, vectors: np.ndarray, ids: np.ndarray):
        if not faiss_available():
            return None  # exact flat search over ``vectors`` (torch/numpy), see module docstring
        if self.cfg.kind == "ivf" and len(vectors) < self.cfg.ivf_nlist:
            return None  # not trainable yet: searched by brute force until enough vectors exist
        index = self._new_faiss(vectors)
        if len(vectors):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        return index

    @property
    def n_rows(self) -> int:
        return len(self.ids)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> DenseIndex:
        """A new index with rows appended (the FAISS index is cloned, this one stays searchable)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        all_v = np.concatenate([self.vectors, vectors]) if self.n_rows else vectors
        all_ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        if self.index is None or len(vectors) == 0:
            return DenseIndex(self.cfg, self.dim, all_v, all_ids)
        index = _faiss().clone_index(self.index)
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        return DenseIndex(self.cfg, self.dim, all_v, all_ids, index)

    def keep_rows(self, keep: np.ndarray) -> DenseIndex:
        """A new index with only the rows where ``keep`` is True (HNSW: rebuilt, it cannot remove)."""
        rows = np.flatnonzero(keep)
        v, ids = self.vectors[rows], self.ids[rows]
        if self.cfg.kind == "hnsw" or self.index is None:
            return DenseIndex(self.cfg, self.dim, np.ascontiguousarray(v), ids)
        index = _faiss().clone_index(self.index)
        index.remove_ids(self.ids[~keep])
        return DenseIndex(self.cfg, self.dim, np.ascontiguousarray(v), ids, index)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (-1 for ids not present, e.g. FAISS padding)."""
        pos = np.searchsorted(self.ids, ids, sorter=self._order)
        pos = np.minimum(pos, max(self.n_rows - 1, 0))
        rows = self._order[pos] if self.n_rows else np.full(len(ids), -1)
        return np.where((self.n_rows > 0) & (self.ids[rows] == ids), rows, -1)

    def _use_torch(self) -> bool:
        if self.cfg.backend == "torch" or self.index is None:
            return True
        if self.cfg.backend == "faiss":
            return False
        import torch

        return torch.cuda.is_available() and not faiss_gpu_available()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (rows (Q, k) int64 with -1 padding, scores (Q, k) float32) by inner product."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)  # (Q, dim)
        k_eff = min(k, self.n_rows)
        if k_eff == 0:
            return np.full((len(q), k), -1), np.full((len(q), k), -np.inf, dtype=np.float32)
        if self._use_torch():
            rows, scores = self._torch_search(q, k_eff)
        else:
            set_faiss_threads(self.cfg.faiss_threads)
            scores, ids = self._searchable().search(q, k_eff)
            rows = self.rows_of(ids.ravel()).reshape(ids.shape)
        pad = k - k_eff
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return rows, scores

    def _searchable(self):
        """The FAISS index to search: a GPU copy (faiss-gpu, flat/ivf) when available, else the CPU one."""
        if self.cfg.kind == "hnsw" or not faiss_gpu_available():  # HNSW has no GPU version
            return self.index
        if self._gpu is None:
            faiss = _faiss()
            self._gpu_res = self._gpu_res or faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
        return self._gpu

    def _torch_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by inner product: torch matmul on the configured device, numpy without torch."""
        try:
            import torch
        except ImportError:
            return _numpy_topk(q, np.asarray(self.vectors, dtype=np.float32), k)
        if self._torch is None:
            dev = self.cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._torch = torch.from_numpy(np.ascontiguousarray(self.vectors)).to(dev)
        v = self._torch
        sims = torch.from_numpy(q).to(v.device) @ v.T  # (Q, N)
        top = torch.topk(sims, k, dim=1)
        return top.indices.cpu().numpy().astype(np.int64), top.values.float().cpu().numpy()

    def save(self, d: Path) -> None:
        np.save(d / "dense_vectors.npy", self.vectors, allow_pickle=False)
        np.save(d / "dense_ids.npy", self.ids, allow_pickle=False)
        if self.index is not None:
            _faiss().write_index(self.index, str(d / "dense.faiss"))

    @classmethod
    def load(cls, d: Path, cfg: DenseConfig, dim: int, mmap: bool = False) -> DenseIndex:
        try:
            vectors = np.load(d / "dense_vectors.npy", mmap_mode="r" if mmap else None)
            ids = np.load(d / "dense_ids.npy")
            index = None
            if not faiss_available():
                pass  # exact search over the stored vectors; a dense.faiss file, if any, is not needed
            elif (d / "dense.faiss").exists():
                index = _faiss().read_index(str(d / "dense.faiss"))
            elif not (cfg.kind == "ivf" and len(ids) < cfg.ivf_nlist) and len(ids):
                log.info("%s has no dense.faiss (written without faiss): rebuilding it from the vectors", d)
                return cls(cfg, dim, np.ascontiguousarray(vectors, dtype=np.float32), ids)
        except (OSError, ValueError, RuntimeError) as e:
            raise CorruptIndexError(f"cannot load dense index files in {d}: {e}") from e
        if vectors.shape != (len(ids), dim) or (index is not None and index.ntotal != len(ids)):
            raise CorruptIndexError(f"dense files in {d} disagree: vectors {vectors.shape}, {len(ids)} ids")
        if index is not None and cfg.kind == "hnsw":
            _faiss().downcast_index(index.index).hnsw.efSearch = cfg.hnsw_ef_search
        return cls(cfg, dim, vectors, ids, index)


def _numpy_topk(q: np.ndarray, v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows of ``q @ v.T`` (Q, k), best first; ties broken by the lower row."""
    sims = q @ v.T  # (Q, N)
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (Q, k) unordered
    order = np.lexsort((part, -np.take_along_axis(sims, part, 1)), axis=1)
    rows = np.take_along_axis(part, order, 1)
    return rows.astype(np.int64), np.take_along_axis(sims, rows, 1).astype(np.float32)
