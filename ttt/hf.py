"""Import a local Hugging Face ``LlamaForCausalLM`` (or Mistral-architecture) checkpoint directory.

The result runs in the Llama-variant mode of ``ModelConfig``: pre-norm only (no post norms), no QK-norm, GQA,
rotate-half RoPE with the checkpoint's theta, untied head unless the checkpoint ties it, full attention
(``window=None``; Mistral's ``sliding_window`` when set). Optionally the last ``n_ttt_layers`` blocks get a
prime MLP: w1/w3 ~ N(0, init_std^2) and **w2 = 0**, so the prime sublayer adds exactly zero at first and the
imported model's logits are unchanged. (With w2 = 0 the first inner step only moves w2; w1/w3 follow.)

Reads ``config.json`` and ``model.safetensors`` (or sharded ``model-*.safetensors``) with safetensors only;
``transformers`` is not needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ttt.config import ModelConfig
from ttt.model import TTTModel

log = logging.getLogger(__name__)

_SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM"}
# our name (per block) -> Hugging Face name (per layer)
_BLOCK_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}


def hf_config_to_ours(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig (Llama variant) for a Hugging Face config dict."""
    arch = set(hf.get("architectures") or [])
    if arch and not arch & _SUPPORTED:
        raise ValueError(f"unsupported architecture {sorted(arch)}; supported: {sorted(_SUPPORTED)}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
        raise ValueError(f"rope scaling {rope_type!r} is not supported (only plain RoPE)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("checkpoints with attention/MLP biases are not supported (the model has no biases)")
    n_heads = hf["num_attention_heads"]
    base = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        mlp_hidden=hf["intermediate_size"], n_ttt_layers=0, window=hf.get("sliding_window"),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), rope_interleaved=False,
        norm_eps=hf.get("rms_norm_eps", 1e-6), pre_norm=True, post_norm=False, qk_norm=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
        extra={"hf_architectures": sorted(arch)},
    )  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


def _load_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(src.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no model*.safetensors in {src} (convert .bin checkpoints to safetensors first)"
        )
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def from_hf(path: str | Path, **overrides: Any) -> TTTModel:
    """Build a ``TTTModel`` from a local HF Llama dir. Overrides go to ``ModelConfig`` (e.g. n_ttt_layers,
    window, ttt_chunk, ttt_lr)."""
    src = Path(path)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}/config.json missing: expected a Hugging Face checkpoint dir")
    cfg = hf_config_to_ours(json.loads((src / "config.json").read_text()), **overrides)
    hf = _load_hf_weights(src)
    model = TTTModel(cfg)  # random init; the prime MLPs keep theirs (w2 zeroed below)
    ours: dict[str, torch.Tensor] = {
        "tok_emb.weight": hf["model.embed_tokens.weight"],
        "ln_f.weight": hf["model.norm.weight"],
    }
    if not cfg.tie_embeddings:
        ours["lm_head.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
    for i in range(cfg.n_layers):
        for mine, theirs in _BLOCK_MAP.items():
            ours[f"blocks.{i}.{mine}"] = hf[f"model.layers.{i}.{theirs}"]
    sd = model.state_dict()
    for k, v in ours.items():
        if sd[k].shape != v.shape:
            raise ValueError(
                f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs config {tuple(sd[k].shape)}"
            )
    with torch.no_grad():
        for k, v in ours.items():
            sd[k].copy_(v.to(sd[k].dtype))
        for i in range(cfg.n_prefix_layers, cfg.n_layers):
            model.blocks[i].prime.w2.weight.zero_()  # the prime sublayer starts as an exact no-op
    log.info("imported %s: %d layers, %d with prime MLPs", src, cfg.n_layers, cfg.n_ttt_layers)
    return model.eval()
