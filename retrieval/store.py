"""On-disk layout and crash safety of an index store (one directory per corpus).

    store_dir/
      manifest.json          the committed version: {"version", "dir", "documents": {id: {sha256,
                             n_chars, chunk_ids}}, "files": {name: bytes}, "config", ...}
      versions/v000007/      every file of version 7 (+ its own manifest.json copy)
      .lock                  writer lock (fcntl.flock; released by the kernel if the writer dies)
      memory/                owned by hybrid (TTT state snapshots): never touched here

A write builds ``.tmp-*`` completely, fsyncs it, renames it to ``versions/vN`` and only then
replaces ``manifest.json`` atomically (``os.replace`` of an fsynced temp file). A crash at any point
leaves the previous manifest, which still names a complete version directory. The previous version
directory is kept (``KEEP_VERSIONS``) so it also stays openable by number.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import CorruptIndexError, IndexNotFoundError, StoreLockedError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KEEP_VERSIONS = 2  # current + previous


def version_dir(store_dir: Path, version: int) -> Path:
    return store_dir / "versions" / f"v{version:06d}"


@contextlib.contextmanager
def writer_lock(store_dir: Path, wait: bool = True) -> Iterator[None]:
    """Exclusive writer lock on ``store_dir/.lock`` (blocks unless ``wait=False``)."""
    fd = os.open(store_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as e:
            raise StoreLockedError(f"another process is writing to {store_dir}") from e
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _fsync_path(p: Path, directory: bool = False) -> None:
    fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_version(store_dir: Path, version: int, fill: Callable[[Path], None]) -> dict[str, int]:
    """Write a complete version directory via a temp dir; returns {file name: size in bytes}."""
    tmp = store_dir / f".tmp-v{version:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    files = {}
    for f in sorted(tmp.iterdir()):
        _fsync_path(f)
        files[f.name] = f.stat().st_size
    _fsync_path(tmp, directory=True)
    final = version_dir(store_dir, version)
    final.parent.mkdir(exist_ok=True)
    if final.exists():  # left over by a writer that died after the rename, before the commit
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(final.parent, directory=True)
    return files


def commit_manifest(store_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomically make ``manifest`` the store's current version (also copied into its version dir)."""
    data = json.dumps(manifest, ensure_ascii=False, separators=(",", ":"))
    vdir = store_dir / manifest["dir"]
    (vdir / MANIFEST).write_text(data, encoding="utf-8")
    _fsync_path(vdir / MANIFEST)
    tmp = store_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, store_dir / MANIFEST)
    _fsync_path(store_dir, directory=True)


def read_manifest(store_dir: Path, version: int | None = None) -> dict[str, Any]:
    """The committed manifest, or that of a retained older ``version``."""
    path = store_dir / MANIFEST if version is None else version_dir(store_dir, version) / MANIFEST
    if not path.exists():
        what = "no index" if version is None else f"no version {version}"
        raise IndexNotFoundError(f"{what} in {store_dir} ({path} missing); create one with Index.create")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(m, dict) and {"version", "dir", "documents", "files"} <= m.keys()
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as e:
        raise CorruptIndexError(f"{path} is not a valid index manifest: {e}") from e
    return m


def check_files(store_dir: Path, manifest: dict[str, Any]) -> Path:
    """The version dir, after checking every listed file exists with its recorded size."""
    vdir = store_dir / manifest["dir"]
    for name, size in manifest["files"].items():
        p = vdir / name
        if not p.exists():
            raise CorruptIndexError(f"index file {p} is missing (version {manifest['version']})")
        if p.stat().st_size != size:
            raise CorruptIndexError(f"index file {p} has {p.stat().st_size} bytes, manifest says {size}")
    return vdir


def collect_garbage(store_dir: Path, current: int) -> None:
    """Remove temp dirs of dead writers and version dirs older than the retained ones."""
    for tmp in store_dir.glob(".tmp-v*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in store_dir.glob(f".{MANIFEST}.*.tmp"):
        stale.unlink(missing_ok=True)
    versions = store_dir / "versions"
    if not versions.exists():
        return
    for d in versions.iterdir():
        if d.name.startswith("v") and d.name[1:].isdigit() and int(d.name[1:]) <= current - KEEP_VERSIONS:
            shutil.rmtree(d, ignore_errors=True)
