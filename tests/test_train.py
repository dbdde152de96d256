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
    compute_loss,
    evaluate,
    export,
    ilr_scale_at,
    is_meta_step,
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


@pytest.mark.parametrize("mode", ["e2e", "frozen", "fa"])
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
    assert (fresh.cfg.n_ttt_layers > 0) == (mode != "fa") and (fresh.cfg.window is None) == (mode == "fa")


def test_frozen_step_is_meta_loss_with_inner_lr_zero(data_dir: Path) -> None:
    """mode frozen trains the hybrid reader's setting: its plain-forward loss and gradients equal meta_loss with
    the inner lr scaled to 0 (float64), while its meta steps (every meta_every-th) are meta_loss itself."""
    from ttt.config import ModelConfig
    from ttt.data import SequenceLoader
    from ttt.model import TTTModel

    torch.manual_seed(0)
    model = TTTModel(ModelConfig.from_name("debug", **_TINY, vocab_size=512, bos_id=1)).double()
    tokens = SequenceLoader(data_dir, "train", 32, 2, shuffle=False).next_batch()
    cfg = _cfg(data_dir, mode="frozen", meta_every=3)
    assert [is_meta_step(cfg, s) for s in range(7)] == [False, False, True, False, False, True, False]
    assert all(is_meta_step(_cfg(data_dir, mode="e2e"), s) for s in range(3))
    assert not any(is_meta_step(_cfg(data_dir, mode="frozen"), s) for s in range(5))
    plain = compute_loss(model, tokens, cfg, step=0)
    g_plain = torch.autograd.grad(plain, list(model.parameters()), allow_unused=True)
    ref = model.meta_loss(tokens, ilr_scale=0.0)
    g_ref = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    assert abs(float(plain.detach()) - float(ref.detach())) < 1e-10, (
        float(plain.detach()),
        float(ref.detach()),
    )
    for a, b in zip(g_plain, g_ref, strict=True):
        if a is None or b is None:
            assert (a is None or not a.abs().any()) and (b is None or not b.abs().any())
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    meta = compute_loss(model, tokens, cfg, step=2)
    with torch.no_grad():
        want = model.meta_loss(tokens, ilr_scale=ilr_scale_at(2, cfg))
    assert abs(float(meta.detach()) - float(want.detach())) < 1e-12
    assert abs(float(meta.detach()) - float(plain.detach())) > 1e-6, (
        "a meta step must update the fast weights while reading"
    )


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
    with pytest.raises(ValueError, match="meta_every"):
        TrainConfig(data_dir="x", mode="e2e", meta_every=2)
    with pytest.raises(ValueError, match="answer_weight"):
        TrainConfig(data_dir="x", mode="e2e", answer_weight=4.0)
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


def _answer_mask_brute(seq: list[int], marker: list[int], resets: set[int]) -> list[bool]:
    out, inside = [], False
    for t, tok in enumerate(seq):
        if tok in resets:
            inside = False
        if t + 1 >= len(marker) and seq[t + 1 - len(marker) : t + 1] == marker:
            inside = True
        out.append(inside)
    return out


def test_answer_mask_matches_a_scan_and_weights_the_loss() -> None:
    """answer_mask == a plain left-to-right scan on random streams with planted markers; the weighted loss ==
    the float64 weighted mean of per-token CE written out by hand; weight 1 == the unweighted loss."""
    from ttt.config import ModelConfig
    from ttt.model import TTTModel
    from ttt.train import answer_mask, lm_loss

    g = torch.Generator().manual_seed(0)
    marker, resets = [5, 6, 7], {1, 2}
    x = torch.randint(3, 12, (4, 200), generator=g)
    for b in range(4):  # plant markers and resets at random places
        for t in torch.randint(0, 197, (6,), generator=g).tolist():
            x[b, t : t + 3] = torch.tensor(marker)
        x[b, torch.randint(0, 200, (5,), generator=g)] = torch.tensor([1, 2, 1, 2, 2])
    got = answer_mask(x, marker, sorted(resets))
    for b in range(4):
        assert got[b].tolist() == _answer_mask_brute(x[b].tolist(), marker, resets)
    assert got.any() and not got.all()

    torch.manual_seed(0)
    model = TTTModel(ModelConfig.from_name("debug", **_TINY, vocab_size=16, bos_id=1)).double()
    tokens = x[:, :33]
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        w = answer_mask(tokens[:, :-1], marker, [1, 2]).double() * 3.0
        w = torch.where(w > 0, w, torch.ones_like(w)) * (tokens[:, 1:] != 1)
        want = float((ce * w).sum() / w.sum())
        got_w = float(lm_loss(model, tokens, (marker, [1, 2], 3.0)))
        plain = float(lm_loss(model, tokens))
        assert (
            abs(got_w - want) < 1e-12
            and abs(float(lm_loss(model, tokens, (marker, [1, 2], 1.0))) - plain) < 1e-12
        )
        assert abs(got_w - plain) > 1e-6
