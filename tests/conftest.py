"""Shared pytest configuration: GPU tests skip without CUDA; shared-data tests skip without ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TTT_RAG_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the calling test with a clear reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (the project's ../shared data); absent in a user's clone")
    return p


def pytest_configure(config: pytest.Config) -> None:
    # Tiny test models: on a small (2-core, shared) CI machine torch's intra-op threads cost more than they
    # give (measured 20-75x slower for small matmuls with 2 threads), and faiss's OpenMP pool fights torch's.
    import torch

    torch.set_num_threads(int(os.environ.get("TTT_RAG_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
