"""Shared helpers for benchmarks and evaluations: run metadata and JSON results under eval/results/."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_sha(repo: Path | None = None) -> str:
    """The checkout's HEAD sha (with '-dirty' when the tree has changes), or 'unknown'."""
    cwd = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("TTT_RAG_GIT_SHA", "unknown")


def device_info() -> dict[str, Any]:
    """CPU/GPU description of this machine (torch imported lazily)."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            info["cuda"] = torch.version.cuda
            info["device"] = "cuda"
        else:
            info["device"] = "cpu"
    except ImportError:
        info["device"] = "cpu"
    return info


def run_metadata(config: dict[str, Any] | None = None, seed: int | None = None) -> dict[str, Any]:
    """The header every results JSON carries: device, git sha, config, seed, timestamp."""
    return {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device_info(),
        "config": config or {},
        "seed": seed,
    }


def write_results(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``payload`` as pretty JSON to ``out_dir/name`` (default eval/results/) and return the path."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if name.endswith(".json") else f"{name}.json")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)
    log.info("wrote %s", path)
    return path
