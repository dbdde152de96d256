"""Loss-vs-context eval end to end on tiny random debug models (TTT-E2E, FA, SWA) and a tiny token stream.

Checks every reported number against a direct recomputation (float64 log-softmax of a plain forward for
FA/SWA, per-sequence ``prefill`` for TTT), that windows come from held-out books only, and the artifacts.
Run: .venv/bin/python -m pytest -q tests/test_loss_vs_context.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import make_data_dir

from eval.loss_vs_context import LossVsContextConfig, evaluate_models, held_out_windows, pieces
from ttt.config import ModelConfig
from ttt.data import TokenStream
from ttt.model import TTTModel
from ttt.tokenizer import Tokenizer

_TINY = dict(
    vocab_size=260, bos_id=0, d_model=32, n_heads=2, mlp_hidden=64, n_layers=2, window=16, ttt_chunk=8
)
CONTEXTS = [8, 16, 32, 128]  # up to 8x the window


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("lvc")
    data, _ = make_data_dir(tmp, synth_share=0.0)
    dirs = {}
    for label, over in {
        "e2e": dict(n_ttt_layers=1),
        "fa": dict(n_ttt_layers=0, window=None),
        "swa": dict(n_ttt_layers=0),
    }.items():
        torch.manual_seed(len(label))
        model = TTTModel(ModelConfig.from_name("debug", **{**_TINY, **over}))
        model.save_pretrained(tmp / label, tokenizer=Tokenizer.byte_level())
        dirs[label] = str(tmp / label)
    return data, dirs


def _direct_nll(model: TTTModel, piece: np.ndarray) -> np.ndarray:
    """Reference for one (T+1,) piece, computed one sequence at a time in float64."""
    x = torch.from_numpy(piece[None])
    with torch.no_grad():
        if model.cfg.n_ttt_layers > 0:
            return model.prefill(x).token_nll[0, 1:].double().numpy()
        logp = torch.log_softmax(model(x[:, :-1])[0].double(), dim=-1)  # (T, V)
        return -logp[torch.arange(len(piece) - 1), x[0, 1:]].numpy()


def test_windows_come_from_validation_books_only(setup) -> None:
    data, _ = setup
    w = held_out_windows(data, 128, 6, seed=3)
    assert w.shape == (6, 129)
    assert np.array_equal(w, held_out_windows(data, 128, 6, seed=3)), "seeded"
    val = TokenStream(data, "val")
    books = [val.slice(b["start"], b["end"]) for b in val.index["books"] if b["split"] == "val"]
    for row in w:
        assert any(np.array_equal(bk[s : s + 129], row) for bk in books for s in range(len(bk) - 128)), (
            "window not found inside a single validation book"
        )
    p = pieces(w, 32)
    assert p.shape == (6 * 4, 33) and np.array_equal(p[1], w[0, 32:65]), "pieces overlap by one token"
    with pytest.raises(ValueError, match="no validation book holds"):
        held_out_windows(data, 10**7, 1)


def test_reported_losses_equal_direct_recomputation(setup, tmp_path: Path) -> None:
    data, dirs = setup
    cfg = LossVsContextConfig(
        models=dirs, data_dir=str(data), contexts=CONTEXTS, n_seqs=2, batch_size=3, bins=1000,
        device="cpu", out_dir=str(tmp_path), name="lvc",
    )  # fmt: skip
    payload = evaluate_models(cfg)
    windows = held_out_windows(data, CONTEXTS[-1], 2, seed=0)
    for label, d in dirs.items():
        model = TTTModel.from_pretrained(d, dtype=torch.float32).eval()
        res = payload["models"][label]
        assert res["kind"] == {"e2e": "ttt-e2e", "fa": "fa", "swa": "swa"}[label]
        for T in CONTEXTS:
            ref = np.stack([_direct_nll(model, p) for p in pieces(windows, T)])  # (N, T)
            assert res["mean_loss"][str(T)] == pytest.approx(ref.mean(), rel=1e-5, abs=1e-6), (label, T)
            pp = res["per_position"][str(T)]
            assert pp["bin_end"] == list(range(1, T + 1))
            np.testing.assert_allclose(pp["nll"], ref.mean(axis=0), rtol=1e-5, atol=1e-6)
        if label == "e2e":  # before the first inner step, TTT scores with W0 = the plain forward
            fwd = torch.log_softmax(model(torch.from_numpy(windows[:, :8])).double(), -1)
            ref0 = -fwd.gather(-1, torch.from_numpy(windows[:, 1:9])[..., None])[..., 0].mean(0)
            np.testing.assert_allclose(
                res["per_position"]["128"]["nll"][:8], ref0.detach().numpy(), rtol=1e-5
            )
    js = json.loads((tmp_path / "lvc.json").read_text())
    assert {"git_sha", "device", "config", "seed", "timestamp"} <= set(js) and js["contexts"] == CONTEXTS
    assert (tmp_path / "lvc.png").stat().st_size > 1000
    md = (tmp_path / "lvc.md").read_text()
    assert "| e2e | ttt-e2e | 16 |" in md and "Difference to FA" in md


def test_bad_config_raises(setup) -> None:
    data, dirs = setup
    with pytest.raises(ValueError, match="at least one model"):
        LossVsContextConfig(models={}, data_dir=str(data))
    with pytest.raises(AssertionError, match="must divide"):
        pieces(np.zeros((1, 101), dtype=np.int64), 30)
