"""Checkpoint directory: ``model.safetensors`` (the raw state dict) + ``config.json`` (+ ``tokenizer.json``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ttt.config import ModelConfig
from ttt.model import TTTModel

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def save_pretrained(model: TTTModel, path: str | Path, tokenizer: Any = None) -> None:
    """Write weights and config (and ``tokenizer.save(dir/tokenizer.json)`` when a tokenizer is given)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(out / WEIGHTS), metadata={"format": "pt", "ttt_rag": "1"})
    (out / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(out / TOKENIZER))
    log.info("saved %s (%d tensors)", out, len(sd))


def from_pretrained(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> TTTModel:
    """Load a directory written by ``save_pretrained``; weights are loaded exactly (strict keys and shapes)."""
    from safetensors.torch import load_file

    src = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (src / name).is_file():
            raise FileNotFoundError(
                f"{src / name} missing: expected a checkpoint dir with {WEIGHTS} and {CONFIG}"
            )
    cfg = ModelConfig.from_dict(json.loads((src / CONFIG).read_text()))
    with torch.device("meta"):
        model = TTTModel(cfg)
    sd = load_file(str(src / WEIGHTS), device=str(device) if device is not None else "cpu")
    missing, unexpected = set(model.state_dict()) - set(sd), set(sd) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"{src / WEIGHTS} does not match its config: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
