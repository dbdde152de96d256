"""Durability: SIGKILL a writer mid-ingest; the store opens at the last commit with every acked document."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from retrieval_helpers import HashEmbedder

from retrieval import Index

REPO = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from retrieval_helpers import HashEmbedder
    from retrieval import Index
    idx = Index.create(sys.argv[1], embedder=HashEmbedder(), exist_ok=True)
    filler = " ".join(f"word{j % 997} sentence filler." for j in range(3000))
    for i in range(1000):
        idx.add([(f"doc-{i}", f"Document {i} holds uniqtok{i}. " + filler)])
        print(f"ACK doc-{i}", flush=True)
    """
)


def _kill_mid_write(store: Path, min_acks: int) -> list[str]:
    """Run the writer, SIGKILL it while a version is being written; return the acknowledged doc ids."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    acked: list[str] = []
    try:
        while len(acked) < min_acks:
            line = proc.stdout.readline()
            assert line, f"writer exited early (rc={proc.poll()})"
            acked.append(line.split()[1])
        deadline = time.monotonic() + 60
        while not list(store.glob(".tmp-v*")):  # a version is being written right now
            assert time.monotonic() < deadline, "writer never started another version"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        acked += [ln.split()[1] for ln in proc.stdout.read().splitlines() if ln.startswith("ACK")]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return acked


def test_sigkill_mid_ingest_keeps_every_acknowledged_document(tmp_path) -> None:
    store = tmp_path / "store"
    acked = _kill_mid_write(store, min_acks=3)
    assert list(store.glob(".tmp-v*")), "the kill should have left a half-written temp version"
    idx = Index.open(store, embedder=HashEmbedder())
    docs = idx.documents()
    assert set(acked) <= set(docs), f"lost acknowledged docs: {set(acked) - set(docs)}"
    assert len(docs) <= len(acked) + 1  # at most the one in flight, if its commit landed
    for d in acked:
        i = d.split("-")[1]
        assert idx.search(f"uniqtok{i}", k=1, mode="bm25")[0].chunk.doc_id == d
        first = idx.chunks(d)[0]
        assert idx.search(first.text, k=1, mode="dense")[0].chunk.id == first.id  # its vector is stored
    # the lock died with the writer: a new writer commits and cleans the dead writer's temp dir
    idx.add([("after", "written after the crash")])
    assert not list(store.glob(".tmp-v*"))
    assert "after" in Index.open(store, embedder=HashEmbedder()).documents()
