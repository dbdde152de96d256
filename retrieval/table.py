"""Chunk table: row-aligned chunk ids, document ids, char offsets and texts (one UTF-8 blob on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .chunker import Chunk
from .errors import CorruptIndexError


class ChunkTable:
    """Immutable table of chunks; texts live in one UTF-8 blob sliced by byte offsets (decoded lazily)."""

    def __init__(
        self, ids: list[str], doc_ids: list[str], pos: np.ndarray, blob: bytes, offsets: np.ndarray
    ) -> None:
        n = len(ids)
        assert len(doc_ids) == n and pos.shape == (n, 2) and offsets.shape == (n + 1,), "ragged chunk table"
        self.ids, self.doc_ids, self.pos, self.blob, self.offsets = ids, doc_ids, pos, blob, offsets

    @classmethod
    def empty(cls) -> ChunkTable:
        return cls([], [], np.zeros((0, 2), np.int64), b"", np.zeros(1, np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def text(self, row: int) -> str:
        return self.blob[self.offsets[row] : self.offsets[row + 1]].decode("utf-8")

    def chunk(self, row: int) -> Chunk:
        row = int(row)
        start, end = (int(x) for x in self.pos[row])
        return Chunk(self.ids[row], self.doc_ids[row], self.text(row), start, end)

    def doc_mask(self, doc_ids: set[str]) -> np.ndarray:
        """(N,) bool: rows belonging to any of ``doc_ids``."""
        return np.fromiter((d in doc_ids for d in self.doc_ids), dtype=bool, count=len(self))

    def rows_of_doc(self, doc_id: str) -> np.ndarray:
        return np.flatnonzero(self.doc_mask({doc_id}))

    def keep_rows(self, keep: np.ndarray) -> ChunkTable:
        rows = np.flatnonzero(keep)
        o = self.offsets
        blob = b"".join(self.blob[o[r] : o[r + 1]] for r in rows)
        offsets = np.concatenate([[0], np.cumsum(np.diff(o)[rows])]).astype(np.int64)
        return ChunkTable(
            [self.ids[r] for r in rows], [self.doc_ids[r] for r in rows], self.pos[rows], blob, offsets
        )

    def append(self, chunks: list[Chunk]) -> ChunkTable:
        enc = [c.text.encode("utf-8") for c in chunks]
        lengths = np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(enc))
        offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(lengths)])
        pos = np.array([(c.start, c.end) for c in chunks], dtype=np.int64).reshape(-1, 2)
        return ChunkTable(
            self.ids + [c.id for c in chunks],
            self.doc_ids + [c.doc_id for c in chunks],
            np.concatenate([self.pos, pos]),
            self.blob + b"".join(enc),
            offsets,
        )

    def save(self, d: Path) -> None:
        (d / "chunks_text.bin").write_bytes(self.blob)
        np.save(d / "chunks_offsets.npy", self.offsets, allow_pickle=False)
        np.save(d / "chunks_pos.npy", self.pos, allow_pickle=False)

    @classmethod
    def load(cls, d: Path, documents: list) -> ChunkTable:
        """Load; ``documents`` (DocumentInfo, in row order) supply chunk and document ids."""
        try:
            blob = (d / "chunks_text.bin").read_bytes()
            offsets = np.load(d / "chunks_offsets.npy")
            pos = np.load(d / "chunks_pos.npy")
        except (OSError, ValueError) as e:
            raise CorruptIndexError(f"cannot load the chunk table in {d}: {e}") from e
        ids = [cid for doc in documents for cid in doc.chunk_ids]
        doc_ids = [doc.doc_id for doc in documents for _ in doc.chunk_ids]
        if offsets.shape != (len(ids) + 1,) or pos.shape != (len(ids), 2) or offsets[-1] != len(blob):
            raise CorruptIndexError(f"chunk table in {d} does not match the manifest ({len(ids)} chunks)")
        return cls(ids, doc_ids, pos, blob, offsets)
