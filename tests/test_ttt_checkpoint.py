"""Checkpoints: bit-exact save/load, pinned state-dict keys, and Hugging Face Llama import vs transformers.
Run: .venv/bin/python -m pytest -q tests/test_ttt_checkpoint.py"""

from __future__ import annotations

import json
import re

import pytest
import torch

from ttt import ModelConfig, TTTModel

# the debug preset's state-dict keys: changing them breaks every saved checkpoint
_BLOCK = ["attn.k_norm.weight", "attn.q_norm.weight", "attn.wk.weight", "attn.wo.weight", "attn.wq.weight",
          "attn.wv.weight", "attn_norm.weight", "attn_post.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight",
          "mlp_norm.weight", "mlp_post.weight"]  # fmt: skip
_PRIME = ["prime.w1.weight", "prime.w2.weight", "prime.w3.weight", "prime_norm.weight", "prime_post.weight"]
PINNED = sorted(["tok_emb.weight", "ln_f.weight"] + [f"blocks.{i}.{k}" for i in range(4) for k in _BLOCK]
                + [f"blocks.3.{k}" for k in _PRIME])  # fmt: skip


def test_state_dict_keys_are_pinned() -> None:
    m = TTTModel(ModelConfig.from_name("debug"))
    assert sorted(m.state_dict()) == PINNED
    assert m.fast_names() == ["blocks.3.prime.w1", "blocks.3.prime.w2", "blocks.3.prime.w3"]


def test_save_load_round_trip_is_bit_exact(tmp_path) -> None:
    from ttt.tokenizer import Tokenizer

    torch.manual_seed(0)
    m = TTTModel(ModelConfig.from_name("debug", ttt_lr=0.3))
    m.save_pretrained(tmp_path / "ck", tokenizer=Tokenizer.byte_level())
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
    }
    m2 = TTTModel.from_pretrained(tmp_path / "ck")
    assert m2.cfg == m.cfg
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    x = torch.randint(0, 512, (1, 40))
    assert torch.equal(m(x), m2(x))
    assert torch.equal(m.prefill(x).token_nll, m2.prefill(x).token_nll)


def test_from_pretrained_rejects_mismatched_dir(tmp_path) -> None:
    TTTModel(ModelConfig.from_name("debug")).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_ttt_layers": 2}))
    with pytest.raises(ValueError, match="missing"):
        TTTModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        TTTModel.from_pretrained(tmp_path / "nope")


def _tiny_llama(tmp_path, tie: bool = False):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_theta=5000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random norm gains so a misplaced norm shows up
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


@pytest.mark.parametrize("tie", [False, True])
def test_from_hf_logits_match_transformers(tmp_path, tie: bool) -> None:
    hf = _tiny_llama(tmp_path, tie)
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        ref = hf(x).logits
    plain = TTTModel.from_hf(tmp_path)
    assert plain.cfg.rope_theta == 5000.0 and plain.cfg.n_kv_heads == 2 and plain.cfg.tie_embeddings == tie
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref, rtol=1e-4, atol=1e-4)
        primed = TTTModel.from_hf(tmp_path, n_ttt_layers=1, ttt_chunk=8)
        torch.testing.assert_close(primed(x), ref, rtol=1e-4, atol=1e-4)
        # TTT on: chunk 1 (W0, prime = 0) still equals HF; later chunks adapt
        nll = primed.prefill(x).token_nll
    ref_nll = torch.nn.functional.cross_entropy(ref[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    torch.testing.assert_close(nll[:, 1:9], ref_nll[:, :8], rtol=1e-4, atol=1e-4)
    assert (nll[:, 10:] - ref_nll[:, 9:]).abs().max() > 1e-6


def test_from_hf_rejects_other_architectures(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        TTTModel.from_hf(tmp_path)


def test_convert_hf_cli_writes_a_loadable_checkpoint(tmp_path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    hf = _tiny_llama(tmp_path / "hf")
    res = CliRunner().invoke(
        app, ["convert-hf", str(tmp_path / "hf"), str(tmp_path / "out"), "--n-ttt-layers", "1"]
    )
    assert res.exit_code == 0, res.output
    m = TTTModel.from_pretrained(tmp_path / "out")
    assert m.cfg.n_ttt_layers == 1 and m.cfg.window is None
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, rtol=1e-4, atol=1e-4)
    res = CliRunner().invoke(app, ["convert-hf", str(tmp_path / "missing"), str(tmp_path / "o2")])
    flat = re.sub(r"[^a-z]", "", res.output.lower())  # rich wraps the error box anywhere
    assert res.exit_code == 2 and "configjsonmissing" in flat, res.output
