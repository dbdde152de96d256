"""Corpus memory: the ``TTTState`` left after the model read the whole corpus, versioned under a store dir.

Layout (``store_dir/memory/``, owned by ``hybrid``; ``retrieval`` never touches it)::

    HEAD.json              current version + the kept history (metadata below), written atomically
    <version>.safetensors  one TTTState snapshot per version (the last ``keep_versions`` are kept)
    texts/<key>.txt        the text of every document read, so the memory can be rebuilt after a delete

Every snapshot is written to a temp file, fsynced and renamed into place before ``HEAD.json`` points at
it, so a crash leaves the previous version loadable. ``HEAD.json`` records each file's sha256; a file that
fails it raises ``CorruptMemoryError`` (naming the file) and ``rollback()`` goes back to the previous one.
A memory is *stale* when documents it read were deleted or changed: it is rebuilt on demand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid.errors import CorruptMemoryError

if TYPE_CHECKING:
    from ttt import TTTState

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class MemoryMeta:
    """What one snapshot holds: which documents were read, in order, and by which model."""

    version: int
    doc_ids: list[str]  # in reading order
    doc_hashes: dict[str, str]  # doc_id -> sha1 of its text
    tokens_read: int  # corpus tokens the state has consumed (separators included)
    model: str  # fingerprint of the model that made it (config + weights sample)
    sha256: str = ""  # of the snapshot file
    stale: bool = False  # documents it read were deleted/changed since
    created: float = field(default_factory=time.time)

    @property
    def file(self) -> str:
        return f"{self.version}.safetensors"


def text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CorpusMemory:
    """Versioned TTTState snapshots plus the document texts they were read from."""

    def __init__(self, store_dir: str | Path, *, keep_versions: int = 2) -> None:
        assert keep_versions >= 2, f"keep_versions must be >= 2 (rollback needs one), got {keep_versions}"
        self.dir = Path(store_dir) / "memory"
        self.keep_versions = keep_versions

    # ---- metadata -------------------------------------------------------------------------------

    def _read_head(self) -> dict[str, Any]:
        path = self.dir / "HEAD.json"
        if not path.exists():
            return {"current": None, "history": []}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CorruptMemoryError(
                f"{path} is unreadable ({e}); delete the memory dir to rebuild it"
            ) from e

    def _write_head(self, head: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / "HEAD.json", json.dumps(head, indent=1).encode())

    def history(self) -> list[MemoryMeta]:
        """Kept snapshots, oldest first."""
        return [MemoryMeta(**m) for m in self._read_head()["history"]]

    def head(self) -> MemoryMeta | None:
        """Metadata of the current snapshot (None before the first save)."""
        head = self._read_head()
        for m in head["history"]:
            if m["version"] == head["current"]:
                return MemoryMeta(**m)
        return None

    # ---- snapshots ------------------------------------------------------------------------------

    def save(self, state: TTTState, meta: MemoryMeta) -> MemoryMeta:
        """Write ``state`` as snapshot ``meta.version`` and make it current (atomically); prune old ones."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / meta.file
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{meta.file}.", suffix=".tmp")
        os.close(fd)
        try:
            state.save(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            meta.sha256 = _file_sha256(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        head = self._read_head()
        hist = [m for m in head["history"] if m["version"] != meta.version] + [asdict(meta)]
        drop, hist = hist[: -self.keep_versions], hist[-self.keep_versions :]
        self._write_head({"current": meta.version, "history": hist})
        for m in drop:
            (self.dir / f"{m['version']}.safetensors").unlink(missing_ok=True)
        log.info(
            "corpus memory v%d saved (%d docs, %d tokens)", meta.version, len(meta.doc_ids), meta.tokens_read
        )
        return meta

    def load(self, version: int | None = None, device: str = "cpu") -> tuple[TTTState, MemoryMeta]:
        """The snapshot ``version`` (default: current) after checking its sha256."""
        from ttt import TTTState

        metas = {m.version: m for m in self.history()}
        cur = self.head()
        meta = cur if version is None else metas.get(version)
        if meta is None:
            raise CorruptMemoryError(
                f"no corpus memory version {version} in {self.dir} (kept: {sorted(metas)})"
            )
        path = self.dir / meta.file
        prev = [v for v in sorted(metas) if v < meta.version]
        hint = f"; previous version {prev[-1]} is kept: call rollback()" if prev else "; re-ingest to rebuild"
        if not path.exists():
            raise CorruptMemoryError(f"corpus memory file {path} is missing{hint}")
        if _file_sha256(path) != meta.sha256:
            raise CorruptMemoryError(f"corpus memory file {path} fails its sha256 check (corrupt){hint}")
        try:
            state = TTTState.load(path, device=device)
        except Exception as e:  # safetensors raises several types on bad headers
            raise CorruptMemoryError(f"corpus memory file {path} is unreadable ({e}){hint}") from e
        return state, meta

    def mark_stale(self) -> None:
        """Flag the current snapshot as out of date (documents it read were deleted or changed)."""
        head = self._read_head()
        for m in head["history"]:
            if m["version"] == head["current"]:
                m["stale"] = True
        self._write_head(head)

    def rollback(self) -> MemoryMeta:
        """Make the previous kept snapshot current (after a corrupt file); it is marked stale."""
        head = self._read_head()
        older = [m for m in head["history"] if head["current"] is None or m["version"] < head["current"]]
        if not older:
            raise CorruptMemoryError(f"no earlier corpus memory to roll back to in {self.dir}")
        prev = older[-1]
        prev["stale"] = True  # it predates documents that were ingested since
        head["history"] = [m for m in head["history"] if m["version"] <= prev["version"]]
        head["current"] = prev["version"]
        self._write_head(head)
        log.warning("corpus memory rolled back to v%d (marked stale)", prev["version"])
        return MemoryMeta(**prev)

    # ---- document texts ---------------------------------------------------------------------------

    def _text_path(self, doc_id: str) -> Path:
        return self.dir / "texts" / f"{hashlib.sha1(doc_id.encode('utf-8')).hexdigest()}.txt"

    def put_text(self, doc_id: str, text: str) -> None:
        path = self._text_path(doc_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, text.encode("utf-8"))

    def get_text(self, doc_id: str) -> str:
        path = self._text_path(doc_id)
        if not path.exists():
            raise CorruptMemoryError(f"text of document {doc_id!r} is missing ({path}); re-ingest it")
        return path.read_text(encoding="utf-8")

    def drop_text(self, doc_id: str) -> None:
        self._text_path(doc_id).unlink(missing_ok=True)
