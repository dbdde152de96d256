"""Training loop: LR/inner-LR schedules vs the formula, loss goes down, bit-exact resume, budget stop, export.

Run: .venv/bin/python -m pytest -q tests/test_train.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_data import make_data_dir

from ttt.train import (
    CKPT_FILE,
    LOG_FILE,
    TrainConfig,
    evaluate,
    export,
    ilr_scale_at,
    lr_at,
    train,
)

# tiny debug model: window 16 > chunk 8, so a 32-token sequence has 4 TTT chunks and spans 2 windows
_TINY = {
    "d_model": 32,
    "n_heads": 2,
    "mlp_hidden": 64,
    "n_layers": 2,
    "n_ttt_layers": 1,
    "window": 16,
    "ttt_chunk": 8,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d, _ = make_data_dir(tmp_path_factory.mktemp("train"), synth_share=0.0)
    return d


def _cfg(data_dir: Path, **kw) -> TrainConfig:
    base = dict(
        data_dir=str(data_dir), model="debug", model_overrides=_TINY, mode="e2e", seq_len=32, batch_size=2,
        steps=4, lr=3e-3, ckpt_every=2, eval_every=3, eval_batches=1, log_every=1, progress=False, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_matches_formula() -> None:
    cfg = TrainConfig(data_dir="x", steps=1000, lr=3e-3, min_lr=1e-5, warmup_frac=0.1, ilr_init=0.1)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(50, cfg) == pytest.approx(1.5e-3, rel=1e-12)
    assert lr_at(100, cfg) == pytest.approx(3e-3, rel=1e-12)
    assert lr_at(550, cfg) == pytest.approx((3e-3 + 1e-5) / 2, rel=1e-12), "cosine midpoint"
    assert lr_at(1000, cfg) == pytest.approx(1e-5, rel=1e-12) and lr_at(5000, cfg) == pytest.approx(1e-5)
    for s in (200, 400, 777):  # closed form, written independently: floor + amplitude * cos^2(pi t / 2)
        t = (s - 100) / 900
        assert lr_at(s, cfg) == pytest.approx(
            1e-5 + (3e-3 - 1e-5) * math.cos(math.pi * t / 2) ** 2, rel=1e-12
        )
    vals = [lr_at(s, cfg) for s in range(1001)]
    assert all(a <= b for a, b in zip(vals[:100], vals[1:101], strict=True))
    assert all(a >= b for a, b in zip(vals[100:-1], vals[101:], strict=True))
    assert ilr_scale_at(0, cfg) == pytest.approx(0.1)
    assert ilr_scale_at(50, cfg) == pytest.approx(0.55)
    assert ilr_scale_at(100, cfg) == ilr_scale_at(900, cfg) == 1.0


@pytest.mark.parametrize("mode", ["e2e", "fa"])
def test_a_few_steps_lower_the_validation_loss(data_dir: Path, tmp_path: Path, mode: str) -> None:
    cfg = _cfg(data_dir, mode=mode, steps=10, lr=2e-2, batch_size=4, eval_every=0, ckpt_every=100)
    res = train(cfg, tmp_path / mode)
    assert res.done and res.step == 10 and res.tokens_seen == 10 * 4 * 32
    ck = torch.load(tmp_path / mode / CKPT_FILE, weights_only=False)
    from ttt.config import ModelConfig
    from ttt.model import TTTModel

    torch.manual_seed(cfg.seed)
    fresh = TTTModel(ModelConfig.from_dict(ck["model_config"]))  # same seed = the run's initial weights
    from ttt.data import SequenceLoader

    val = SequenceLoader(data_dir, "val", 32, 4, shuffle=False)
    batches = [val.next_batch()]
    before = evaluate(fresh, batches, torch.device("cpu"), bf16=False)
    assert res.val_loss is not None and res.val_loss < before - 0.5, (
        f"{mode}: {before:.3f} -> {res.val_loss:.3f}"
    )
    assert (fresh.cfg.n_ttt_layers > 0) == (mode == "e2e") and (fresh.cfg.window is None) == (mode == "fa")


def test_resume_is_bit_identical(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_dir)
    full = train(cfg, tmp_path / "full")
    part = train(cfg, tmp_path / "part", stop_after=2)
    assert part.step == 2 and not part.done
    resumed = train(cfg, tmp_path / "part")
    assert resumed.step == full.step == 4 and resumed.done
    a = torch.load(tmp_path / "full" / CKPT_FILE, weights_only=False)
    b = torch.load(tmp_path / "part" / CKPT_FILE, weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"parameter {k} differs after resume"
    for sa, sb in zip(a["optim"]["state"].values(), b["optim"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["loader"] == b["loader"] and a["tokens_seen"] == b["tokens_seen"]

    def losses(run: str) -> list[tuple[int, float]]:
        recs = [json.loads(x) for x in (tmp_path / run / LOG_FILE).read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if "loss" in r]

    assert losses("full") == losses("part"), "log must hold each step once, with identical losses"
    assert a["val_loss"] == b["val_loss"]


def test_resume_with_different_config_is_refused(data_dir: Path, tmp_path: Path) -> None:
    train(_cfg(data_dir, steps=2), tmp_path / "r")
    with pytest.raises(ValueError, match="different config"):
        train(_cfg(data_dir, steps=2, lr=1e-3), tmp_path / "r")
    train(_cfg(data_dir, steps=2, max_minutes=5.0), tmp_path / "r")  # budget may change between commands


def test_time_budget_stops_and_checkpoints(data_dir: Path, tmp_path: Path) -> None:
    res = train(_cfg(data_dir, steps=2, max_minutes=0.01), tmp_path / "b")
    assert res.step == 0 and not res.done and (tmp_path / "b" / CKPT_FILE).is_file()
    again = train(_cfg(data_dir, steps=2, max_minutes=None), tmp_path / "b")
    assert again.done and again.step == 2


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainConfig(data_dir="x", mode="fast")
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        TrainConfig(data_dir="x", seq_len=0)


def test_export_loads_with_from_pretrained(data_dir: Path, tmp_path: Path) -> None:
    from ttt.model import TTTModel
    from ttt.tokenizer import Tokenizer

    train(_cfg(data_dir, steps=2), tmp_path / "e")
    out = export(tmp_path / "e", tmp_path / "model")
    ck = torch.load(tmp_path / "e" / CKPT_FILE, weights_only=False)
    model = TTTModel.from_pretrained(out)
    sd = model.state_dict()
    for k, v in ck["model"].items():
        assert torch.equal(sd[k].to(torch.bfloat16), v.to(torch.bfloat16)), (
            f"{k} not the bf16 of the trained weight"
        )
    assert Tokenizer.from_pretrained(out).sha256() == Tokenizer.from_pretrained(data_dir).sha256()
    assert json.loads((out / "training.json").read_text())["step"] == 2
    warm = train(_cfg(data_dir, steps=1, init_from=str(out), eval_batches=0), tmp_path / "warm", stop_after=0)
    assert warm.step == 0
    ck0 = torch.load(tmp_path / "warm" / CKPT_FILE, weights_only=False)
    for k, v in ck0["model"].items():
        assert torch.equal(v, sd[k].float()), f"init_from did not load {k}"
    with pytest.raises(ValueError, match="config differs"):
        train(_cfg(data_dir, mode="fa", init_from=str(out)), tmp_path / "bad")
