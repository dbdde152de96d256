"""Model configuration: one kw-only dataclass plus named presets (debug + the paper's E2E shapes).

Shapes follow ``ttt-e2e.md`` §1.1 (official configs/model/*.yaml). The E2E presets use the reduced MLP
width (about 0.8x the FA width) so that L static MLPs + L/4 prime MLPs hold the parameters of L FA MLPs.
Controls: ``ModelConfig.fa_control(name)`` (full attention, no TTT, FA MLP width) and
``ModelConfig.swa_control(name)`` (sliding window, no TTT, FA MLP width).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# name -> (n_layers, d_model, n_heads, mlp_hidden FA, mlp_hidden E2E, n_ttt_layers)
_PAPER_SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "125m": (12, 768, 12, 2048, 1664, 3),
    "350m": (24, 1024, 16, 2816, 2304, 6),
    "760m": (24, 1536, 16, 4096, 3328, 6),
    "1b": (24, 2048, 32, 5376, 4352, 6),
    "3b": (32, 2560, 32, 6912, 5632, 8),
}

# Our own scaled-down presets. ``ref``: the shipped reference model (issue 5; models/README.md says why):
# paper ratios kept (L/4 TTT blocks, E2E MLP ~0.8x the FA width, k/b = 4), window 512, chunk 128,
# trained at 4K tokens = 8 windows; 17.5M parameters = 35 MB in bf16.
_OUR_PRESETS: dict[str, dict[str, Any]] = {
    "ref": dict(vocab_size=8192, d_model=384, n_layers=8, n_heads=6, mlp_hidden=832, n_ttt_layers=2,
                window=512, ttt_chunk=128, rope_theta=10000.0),
}  # fmt: skip
_FA_WIDTHS: dict[str, int] = {"ref": 1024} | {k: v[3] for k, v in _PAPER_SHAPES.items()}


@dataclass(kw_only=True)
class ModelConfig:
    """Everything that fixes the shape and the test-time-training rule of a ``TTTModel``."""

    vocab_size: int = 128256  # Llama-3 tokenizer in the paper; overridable (debug: 512, byte-level fits)
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # GQA (Llama variant); None = n_heads (the paper has no GQA)
    head_dim: int | None = None  # None = d_model // n_heads
    mlp_hidden: int = 1664  # static SwiGLU width (E2E width in the paper presets)
    prime_hidden: int | None = None  # prime (fast-weight) SwiGLU width; None = mlp_hidden
    n_ttt_layers: int = 3  # the last n_ttt_layers blocks carry a prime MLP; 0 = no TTT
    window: int | None = 8192  # sliding window k, counting the token itself; None = full causal attention
    ttt_chunk: int = 1024  # b: tokens per inner SGD step
    ttt_lr: float = 1.0  # inner SGD learning rate eta
    ttt_clip: float = 1.0  # global-norm clip over all fast weights of one sequence (jointly)
    rope_theta: float = 500000.0
    rope_interleaved: bool = True  # official: interleaved pairs (x0,x1); HF Llama: rotate_half (False)
    norm_eps: float = 1e-6
    pre_norm: bool = True  # RMSNorm on every sublayer input
    post_norm: bool = True  # RMSNorm on every sublayer output (sandwich); Llama variant: False
    qk_norm: bool = True  # RMSNorm over head_dim on q and k before RoPE (one gain shared by heads)
    tie_embeddings: bool = True  # logits = h @ tok_emb.T; False adds lm_head (Llama variant)
    init_std: float = 0.02  # every linear + embedding ~ N(0, init_std^2), norms = 1
    bos_id: int | None = None  # when set, BOS *targets* are masked out of the inner (and meta) loss
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (e.g. source HF dir)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            assert self.d_model % self.n_heads == 0, f"d_model {self.d_model} % n_heads {self.n_heads} != 0"
            self.head_dim = self.d_model // self.n_heads
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.prime_hidden is None:
            self.prime_hidden = self.mlp_hidden
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on an inconsistent configuration."""
        checks = [
            (self.vocab_size > 0, f"vocab_size must be > 0, got {self.vocab_size}"),
            (self.n_layers > 0, f"n_layers must be > 0, got {self.n_layers}"),
            (
                0 <= self.n_ttt_layers <= self.n_layers,
                f"n_ttt_layers {self.n_ttt_layers} not in [0, n_layers]",
            ),
            (
                self.n_heads % self.n_kv_heads == 0,
                f"n_heads {self.n_heads} % n_kv_heads {self.n_kv_heads} != 0",
            ),
            (self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}"),
            (self.window is None or self.window >= 1, f"window must be >= 1 or None, got {self.window}"),
            (self.ttt_chunk >= 1, f"ttt_chunk must be >= 1, got {self.ttt_chunk}"),
            (self.ttt_clip > 0, f"ttt_clip must be > 0, got {self.ttt_clip}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def n_prefix_layers(self) -> int:
        """Blocks without fast weights (run once over the whole input)."""
        return self.n_layers - self.n_ttt_layers

    def replace(self, **overrides: Any) -> ModelConfig:
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """Preset by name: ``debug``, ``ref`` (the shipped reference model) or a paper E2E shape ``125m`` ... ``3b``."""
        if name == "debug":
            base: dict[str, Any] = dict(
                vocab_size=512, d_model=64, n_layers=4, n_heads=4, mlp_hidden=128,
                n_ttt_layers=1, window=64, ttt_chunk=16, ttt_lr=1.0, ttt_clip=1.0,
                rope_theta=10000.0,
            )  # fmt: skip
        elif name in _OUR_PRESETS:
            base = dict(_OUR_PRESETS[name])
        elif name in _PAPER_SHAPES:
            n_layers, d, heads, _fa, e2e, suffix = _PAPER_SHAPES[name]
            base = dict(d_model=d, n_layers=n_layers, n_heads=heads, mlp_hidden=e2e, n_ttt_layers=suffix)
        else:
            raise ValueError(f"unknown preset {name!r}; choose from {preset_names()}")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def fa_control(cls, name: str, **overrides: Any) -> ModelConfig:
        """Full-attention baseline of a paper shape: no TTT, window=None, the FA MLP width."""
        return cls.from_name(name, **{"n_ttt_layers": 0, "window": None, **_fa_width(name), **overrides})

    @classmethod
    def swa_control(cls, name: str, **overrides: Any) -> ModelConfig:
        """Sliding-window baseline of a paper shape: no TTT, same window, the FA MLP width."""
        return cls.from_name(name, **{"n_ttt_layers": 0, **_fa_width(name), **overrides})


def _fa_width(name: str) -> dict[str, Any]:
    return {"mlp_hidden": _FA_WIDTHS[name]} if name in _FA_WIDTHS else {}


def preset_names() -> list[str]:
    return ["debug", *_OUR_PRESETS, *_PAPER_SHAPES]
