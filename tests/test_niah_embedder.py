"""The compact MiniLM export for the GPU box: int8 quantisation bounds, size, and embeddings of the exported
model against the original (cosine >= 0.999 on 50 sentences), loaded offline through ``Embedder``.

Run: .venv/bin/python -m pytest -q tests/test_niah_embedder.py
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from eval.niah.export_embedder import export_embedder, quantize_int8
from eval.niah.tasks import LOWLEX_ADJ, LOWLEX_NOUN, RULER_NEEDLE
from retrieval.embedder import ENV_DIR, Embedder, default_model_dir, dequantize_int8


def _sentences(n: int) -> list[str]:
    """Varied English: NIAH needles, questions and plain prose fragments of 3-40 words."""
    rng = random.Random(0)
    words = [w for pair in LOWLEX_ADJ + LOWLEX_NOUN for w in pair] + (
        "the of and to in is was for on with as by at from this that it be are were have has had not but "
        "startup founders investors users growth product essay city river mountain winter market price"
    ).split()
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(RULER_NEEDLE.format(type_needle_v="numbers", key=f"{rng.choice(words)}-{rng.choice(words)}",
                                           value=rng.randint(10**6, 10**7 - 1)))  # fmt: skip
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))).capitalize() + ".")
    return out


def test_quantize_int8_error_bound_and_groups() -> None:
    w = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    w[2] = 0.0  # an all-zero row must not divide by zero
    for group in (None, 64):
        q, scale = quantize_int8(w, group)
        assert q.dtype == np.int8 and scale.shape == (6, 1 if group is None else 2)
        back = dequantize_int8({"w": q, "w.__scale__": scale})["w"]
        step = np.repeat(scale.astype(np.float32), 128 // scale.shape[1], axis=1)  # (6, 128) per element
        assert np.all(np.abs(back - w) <= step / 2 + 1e-6), "int8 error exceeds half a quantisation step"
        assert np.all(back[2] == 0.0)
    with pytest.raises(AssertionError, match="groups"):
        quantize_int8(w, 48)


@pytest.fixture(scope="module")
def original() -> Embedder:
    return Embedder(default_model_dir(), device="cpu")


def test_float16_export_files(tmp_path) -> None:
    rep = export_embedder(tmp_path / "fp16", dtype="float16")
    from safetensors.numpy import load_file

    w = load_file(str(tmp_path / "fp16" / "model.safetensors"))
    assert {v.dtype for v in w.values()} == {np.dtype("float16")} and rep.n_params == sum(
        v.size for v in w.values()
    )
    with pytest.raises(ValueError, match="unknown export dtype"):
        export_embedder(tmp_path / "x", dtype="int4")


def test_int8_export_matches_original(original: Embedder, tmp_path) -> None:
    """The int8 export (what travels to the GPU box; the float16 one is 43.8 MiB, too big to carry)."""
    rep = export_embedder(tmp_path / "int8", dtype="int8")
    assert rep.mib <= 22.6, f"int8 export is {rep.mib:.2f} MiB"
    assert not any(name.endswith(("vocab.txt", "README.md", "model.safetensors")) for name in rep.files)
    exported = Embedder(tmp_path / "int8", device="cpu")
    sents = _sentences(50)
    a, b = original.encode(sents), exported.encode(sents)
    assert b.dtype == np.float32 and b.shape == (50, 384) and exported.dim == 384
    cos = (a * b).sum(axis=1)
    assert cos.min() >= 0.999, f"min cosine {cos.min():.5f} to the original"
    # retrieval order is what matters downstream: the nearest neighbour of every sentence is unchanged
    np.testing.assert_array_equal((a @ a.T).argsort(1)[:, -2], (b @ b.T).argsort(1)[:, -2])


def test_env_dir_overrides_default(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=ENV_DIR):
        default_model_dir()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "model.int8.safetensors").write_bytes(b"")
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "e"))
    assert default_model_dir() == tmp_path / "e"
