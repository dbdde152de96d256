"""``Index``: chunking + BM25 + dense + RRF fusion over a versioned, crash-safe store directory.

    idx = Index.create(store_dir)                  # dense=False: BM25 only, never loads the embedder
    idx.add([("doc-1", "text ..."), ...])          # -> chunk ids; same doc id again = update
    idx.search("query", k=5, mode="hybrid")        # -> [SearchHit(chunk, score, scores)]
    idx.delete(["doc-1"]); idx.documents(); idx.version

Every mutation validates all input first (nothing changes on a bad call), builds the next version in
memory, writes it to disk (see ``store.py``) and only then replaces the in-memory state, so an
acknowledged ``add`` survives a crash and a failed one leaves the previous version intact.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import store
from .bm25 import BM25Config, BM25Index, top_k
from .chunker import Chunk, ChunkerConfig, iter_chunks
from .dense import DenseConfig, DenseIndex
from .errors import (
    CorruptIndexError,
    DenseUnavailableError,
    IndexExistsError,
    InvalidInputError,
    UnknownModeError,
)
from .fusion import rrf
from .table import ChunkTable
from .tokenize import tokenize
from .validate import check_k, check_query, normalize_docs

log = logging.getLogger(__name__)

MODES = ("hybrid", "bm25", "dense")
FORMAT = 1


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A retrieved chunk: fused ``score`` (mode's own score for bm25/dense) and per-retriever scores."""

    chunk: Chunk
    score: float
    scores: dict[str, float]


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    doc_id: str
    sha256: str
    n_chars: int
    chunk_ids: list[str]


@dataclass(kw_only=True)
class IndexConfig:
    chunker: ChunkerConfig = field(default_factory=ChunkerConfig)
    bm25: BM25Config = field(default_factory=BM25Config)
    dense: DenseConfig | None = field(default_factory=DenseConfig)  # None: BM25 only
    rrf_k: int = 60  # reciprocal-rank-fusion constant
    # each retriever's top-n hits come first (retrieval/fusion.py says why); 0 = plain RRF
    rrf_leaders: int = 1
    weights: dict[str, float] = field(default_factory=lambda: {"bm25": 1.0, "dense": 1.0})
    hybrid_candidates: int = 100  # per-retriever depth fed to fusion (at least k)
    max_query_chars: int = 4096
    max_k: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexConfig:
        dense = d.get("dense")
        return cls(
            chunker=ChunkerConfig(**d["chunker"]),
            bm25=BM25Config(**d["bm25"]),
            dense=DenseConfig(**dense) if dense is not None else None,
            **{k: v for k, v in d.items() if k not in ("chunker", "bm25", "dense")},
        )


class Index:
    """A searchable corpus stored in ``store_dir`` (see module docstring)."""

    def __init__(self, store_dir: Path, manifest: dict[str, Any], embedder=None, mmap: bool = True) -> None:
        self.store_dir, self.embedder, self._mmap = Path(store_dir), embedder, mmap
        self._load(manifest)

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(
        cls,
        store_dir: str | Path,
        *,
        dense: bool = True,
        config: IndexConfig | None = None,
        embedder=None,
        exist_ok: bool = False,
    ) -> Index:
        """A new empty index (version 0). ``dense=False`` builds BM25 only and never loads a model."""
        store_dir = Path(store_dir)
        cfg = config or IndexConfig()
        if not dense:
            cfg = replace(cfg, dense=None)
        store_dir.mkdir(parents=True, exist_ok=True)
        if (store_dir / store.MANIFEST).exists():
            if exist_ok:
                return cls.open(store_dir, embedder=embedder)
            raise IndexExistsError(f"{store_dir} already holds an index; use Index.open or exist_ok=True")
        dim = None
        if cfg.dense is not None:
            embedder = embedder or _default_embedder()
            dim = embedder.dim
        with store.writer_lock(store_dir):
            empty = _State.empty(cfg, dim)
            manifest = _write(store_dir, 0, cfg, empty, {}, embedder)
        return cls(store_dir, manifest, embedder)

    @classmethod
    def open(
        cls, store_dir: str | Path, *, embedder=None, version: int | None = None, mmap: bool = True
    ) -> Index:
        """Open the committed version (or a retained older ``version``, read-only use)."""
        store_dir = Path(store_dir)
        return cls(store_dir, store.read_manifest(store_dir, version), embedder, mmap)

    def _load(self, manifest: dict[str, Any]) -> None:
        if manifest.get("format") != FORMAT:
            raise CorruptIndexError(f"{self.store_dir}: unsupported index format {manifest.get('format')!r}")
        vdir = store.check_files(self.store_dir, manifest)
        self.config = IndexConfig.from_dict(manifest["config"])
        self._docs = {k: DocumentInfo(k, **v) for k, v in manifest["documents"].items()}
        self._manifest = manifest
        table = ChunkTable.load(vdir, list(self._docs.values()))
        bm25 = BM25Index.load(vdir, mmap=self._mmap)
        dense = None
        if self.config.dense is not None:
            dense = DenseIndex.load(vdir, self.config.dense, manifest["dense_dim"], mmap=False)
        self._state = _State(table, bm25, dense)
        if bm25.n_rows != len(table) or (dense is not None and dense.n_rows != len(table)):
            raise CorruptIndexError(f"{vdir}: chunk table, BM25 and dense row counts disagree")

    # ---------------------------------------------------------------- read API
    @property
    def version(self) -> int:
        return int(self._manifest["version"])

    @property
    def dense_enabled(self) -> bool:
        return self.config.dense is not None

    def documents(self) -> dict[str, DocumentInfo]:
        """Stored documents by id, in insertion order."""
        return dict(self._docs)

    def __len__(self) -> int:
        """Number of chunks."""
        return len(self._state.table)

    def chunks(self, doc_id: str) -> list[Chunk]:
        return [self._state.table.chunk(r) for r in self._state.table.rows_of_doc(doc_id)]

    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, dim) unit vectors of ``texts`` with the index's embedder (DenseUnavailableError without one)."""
        if not self.dense_enabled:
            raise DenseUnavailableError("this index was created with dense=False: it has no embedder")
        return self._embed(texts)

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.embedder is None:
            self.embedder = _default_embedder()
        return self.embedder.encode(texts)

    # ---------------------------------------------------------------- search
    def search(
        self, query: str, k: int = 5, mode: str = "hybrid", weights: dict[str, float] | None = None
    ) -> list[SearchHit]:
        """Top-k chunks. bm25/dense modes score with that retriever alone; hybrid fuses both by
        weighted RRF and reports both raw scores for every hit."""
        query = check_query(query, self.config.max_query_chars)
        check_k(k, self.config.max_k)
        if mode not in MODES:
            raise UnknownModeError(f"unknown search mode {mode!r}; choose from {MODES}")
        if mode in ("dense", "hybrid") and self.config.dense is None:
            if mode == "dense":
                raise DenseUnavailableError("this index was created with dense=False; use mode='bm25'")
            mode = "bm25"  # hybrid on a BM25-only index is plain BM25
        st = self._state
        if len(st.table) == 0:
            return []
        if mode == "bm25":
            rows, vals = st.bm25.search(query, k)
            return [
                SearchHit(st.table.chunk(r), float(s), {"bm25": float(s)})
                for r, s in zip(rows, vals, strict=True)
            ]
        qv = self._embed([query])[0]  # (dim,)
        if mode == "dense":
            rows, vals = st.dense.search(qv[None], k)
            return [
                SearchHit(st.table.chunk(r), float(s), {"dense": float(s)})
                for r, s in zip(rows[0], vals[0], strict=True)
                if r >= 0
            ]
        return self._hybrid(st, query, qv, k, weights)

    def _hybrid(
        self, st: _State, query: str, qv: np.ndarray, k: int, weights: dict[str, float] | None
    ) -> list[SearchHit]:
        """Weighted RRF (each retriever's leaders first) of BM25 and dense candidates of one version ``st`` (a concurrent commit is not seen)."""
        depth = max(k, self.config.hybrid_candidates)
        bm, hit = st.bm25.get_scores(tokenize(query))
        b_rows, _ = top_k(bm, depth, np.flatnonzero(hit))
        d_rows, _ = st.dense.search(qv[None], depth)
        d_rows = d_rows[0][d_rows[0] >= 0]
        fused = rrf(
            {"bm25": b_rows.tolist(), "dense": d_rows.tolist()},
            weights or self.config.weights,
            self.config.rrf_k,
            self.config.rrf_leaders,
        )[:k]
        rows = np.array([r for r, _ in fused], dtype=np.int64)
        dense_scores = st.dense.vectors[rows] @ qv  # exact cosine for every fused hit
        return [
            SearchHit(st.table.chunk(r), s, {"bm25": float(bm[r]), "dense": float(ds)})
            for (r, s), ds in zip(fused, dense_scores, strict=True)
        ]

    # ---------------------------------------------------------------- write API
    def add(self, docs) -> list[str]:
        """Add or update documents ``[(doc_id, text or utf-8 bytes), ...]``; returns their chunk ids.

        A document whose id exists is replaced (unchanged content is a no-op). Raises an
        ``InvalidInputError`` subclass before changing anything on empty/invalid/duplicate input.
        """
        items = normalize_docs(docs)
        with store.writer_lock(self.store_dir):
            self._refresh()
            changed = [(d, t, h) for d, t, h in items if d not in self._docs or self._docs[d].sha256 != h]
            if changed:
                self._commit_add(changed)
        return [cid for d, _, _ in items for cid in self._docs[d].chunk_ids]

    def _commit_add(self, changed: list[tuple[str, str, str]]) -> None:
        st, cfg = self._state, self.config
        new_chunks: list[Chunk] = []
        infos = {}
        for doc_id, text, sha in changed:
            cs = list(iter_chunks(doc_id, [text], cfg.chunker))
            new_chunks.extend(cs)
            infos[doc_id] = DocumentInfo(doc_id, sha, len(text), [c.id for c in cs])
        vectors = self._embed([c.text for c in new_chunks]) if cfg.dense is not None else None
        keep = ~st.table.doc_mask(set(infos))
        docs = {k: v for k, v in self._docs.items() if k not in infos} | infos
        nxt = st.keep_rows(keep).append(new_chunks, vectors)
        self._commit(docs, nxt)

    def delete(self, doc_ids: list[str]) -> int:
        """Remove documents by id; returns how many were removed (unknown ids are ignored)."""
        if isinstance(doc_ids, str):
            raise InvalidInputError("delete takes a list of document ids, not a single string")
        ids = set(doc_ids)
        with store.writer_lock(self.store_dir):
            self._refresh()
            gone = ids & self._docs.keys()
            if gone:
                nxt = self._state.keep_rows(~self._state.table.doc_mask(gone))
                self._commit({k: v for k, v in self._docs.items() if k not in gone}, nxt)
        return len(gone)

    def _refresh(self) -> None:
        """Reload if another process committed since we loaded (called under the writer lock)."""
        m = store.read_manifest(self.store_dir)
        if m["version"] != self.version:
            self._load(m)

    def _commit(self, docs: dict[str, DocumentInfo], nxt: _State) -> None:
        version = self.version + 1
        manifest = _write(self.store_dir, version, self.config, nxt, docs, self.embedder)
        self._docs, self._state, self._manifest = docs, nxt, manifest
        store.collect_garbage(self.store_dir, version)
        log.info(
            "committed %s version %d: %d docs, %d chunks", self.store_dir, version, len(docs), len(nxt.table)
        )


@dataclass
class _State:
    """One version's searchable data; rows of table, bm25 and dense are aligned."""

    table: ChunkTable
    bm25: BM25Index
    dense: DenseIndex | None

    @classmethod
    def empty(cls, cfg: IndexConfig, dim: int | None) -> _State:
        dense = None
        if cfg.dense is not None:
            dense = DenseIndex(cfg.dense, dim, np.zeros((0, dim), np.float32), np.zeros(0, np.int64))
        return cls(ChunkTable.empty(), BM25Index.empty(cfg.bm25), dense)

    def keep_rows(self, keep: np.ndarray) -> _State:
        if keep.all():
            return self
        dense = self.dense.keep_rows(keep) if self.dense is not None else None
        return _State(self.table.keep_rows(keep), self.bm25.keep_rows(keep), dense)

    def append(self, chunks: list[Chunk], vectors: np.ndarray | None) -> _State:
        dense = None
        if self.dense is not None:
            dense = self.dense.add(vectors, np.array([_int_id(c.id) for c in chunks], dtype=np.int64))
        return _State(self.table.append(chunks), self.bm25.add([tokenize(c.text) for c in chunks]), dense)


def _int_id(chunk_id: str) -> int:
    """Stable non-negative int64 FAISS id of a chunk id."""
    return int.from_bytes(hashlib.blake2b(chunk_id.encode(), digest_size=8).digest(), "little") >> 1


def _default_embedder():
    from .embedder import Embedder

    return Embedder.default()


def _write(store_dir: Path, version: int, cfg: IndexConfig, st: _State, docs, embedder) -> dict[str, Any]:
    def fill(d: Path) -> None:
        st.table.save(d)
        st.bm25.save(d)
        if st.dense is not None:
            st.dense.save(d)

    files = store.write_version(store_dir, version, fill)
    manifest = {
        "format": FORMAT,
        "version": version,
        "dir": str(store.version_dir(store_dir, version).relative_to(store_dir)),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "dense_model": getattr(embedder, "name", None) if st.dense is not None else None,
        "dense_dim": st.dense.dim if st.dense is not None else None,
        "n_chunks": len(st.table),
        "documents": {
            k: {"sha256": v.sha256, "n_chars": v.n_chars, "chunk_ids": v.chunk_ids} for k, v in docs.items()
        },
        "files": files,
    }
    store.commit_manifest(store_dir, manifest)
    return manifest
