"""The route classifier: standardised features -> multinomial logistic regression -> temperature scaling.

Training is full-batch L-BFGS in float64 (torch, imported lazily), so it is deterministic. The L2
strength is picked by stratified k-fold cross-validated log-loss, and the softmax temperature is
fitted on the same out-of-fold logits (each fold is a validation split the model never trained on),
then the final model is refitted on all training rows. Inference is numpy only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ClassifierConfig:
    l2_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # penalty on mean-CE scale; chosen by CV
    n_folds: int = 5  # folds for L2 selection and out-of-fold temperature fitting
    max_iter: int = 300  # L-BFGS iterations per fit
    seed: int = 0  # fold assignment


@dataclass
class LinearClassifier:
    """softmax((standardise(x) @ W.T + b) / T) over ``classes``."""

    classes: list[str]
    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)
    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    temperature: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)  # fit report, feature layout, embedder name

    def __post_init__(self) -> None:
        c, d = self.weight.shape
        assert len(self.classes) == c, f"{len(self.classes)} classes but weight has {c} rows"
        assert self.mean.shape == (d,) and self.std.shape == (d,), "mean/std must match the feature dim"
        assert self.bias.shape == (c,), f"bias shape {self.bias.shape} != ({c},)"
        assert self.temperature > 0, f"temperature must be > 0, got {self.temperature}"

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Uncalibrated logits (N, C) for features x (N, D)."""
        assert x.ndim == 2 and x.shape[1] == self.dim, f"expected (N, {self.dim}) features, got {x.shape}"
        z = (x.astype(np.float64) - self.mean) / self.std  # (N, D)
        return z @ self.weight.T + self.bias  # (N, C)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (N, C)."""
        return softmax(self.logits(x) / self.temperature)

    def save(self, directory: str | Path, name: str = "router") -> None:
        """Write ``name.safetensors`` (arrays) and ``name.json`` (classes, temperature, meta)."""
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()},
            d / f"{name}.safetensors",
        )
        info = {"classes": self.classes, "temperature": self.temperature, "meta": self.meta}
        (d / f"{name}.json").write_text(json.dumps(info, indent=2))

    @classmethod
    def load(cls, directory: str | Path, name: str = "router") -> LinearClassifier:
        from safetensors.numpy import load_file

        d = Path(directory)
        for p in (d / f"{name}.safetensors", d / f"{name}.json"):
            if not p.is_file():
                raise FileNotFoundError(
                    f"router weights missing: {p} (train with `python -m router.train_default`)"
                )
        t = load_file(d / f"{name}.safetensors")
        info = json.loads((d / f"{name}.json").read_text())
        return cls(
            classes=list(info["classes"]), mean=t["mean"], std=t["std"], weight=t["weight"], bias=t["bias"],
            temperature=float(info["temperature"]), meta=info.get("meta", {}),
        )  # fmt: skip


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| * bin weight."""
    assert probs.ndim == 2 and len(probs) == len(y), f"probs {probs.shape} vs labels {len(y)}"
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)  # conf == 1.0 goes in the top bin
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint index arrays covering range(len(y)), each class spread evenly across folds."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        for i, j in enumerate(idx):
            folds[i % k].append(int(j))
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def fit_logreg(
    x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised x. Returns (mean, std, W (C, D), b (C,))."""
    import torch

    mean = x.mean(axis=0).astype(np.float64)
    std = x.std(axis=0).astype(np.float64) + 1e-6  # constant features stay finite
    z = torch.from_numpy((x - mean) / std)  # (N, D) float64
    t = torch.from_numpy(y.astype(np.int64))
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, t) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problem: intra-op threading costs ~50x here, worse on a busy CPU
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return mean, std, w.detach().numpy().copy(), b.detach().numpy().copy()


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising NLL of softmax(logits / T): grid over log T, then a finer grid around the best."""

    def nll(t: float) -> float:
        p = softmax(logits / t)
        return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))
    best = min(grid, key=nll)
    fine = best * np.exp(np.linspace(-0.03, 0.03, 61))
    return float(min(fine, key=nll))


def _oof_logits(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, cfg: ClassifierConfig) -> np.ndarray:
    out = np.zeros((len(y), n_classes))
    for held in stratified_folds(y, cfg.n_folds, cfg.seed):
        train = np.setdiff1d(np.arange(len(y)), held)
        mean, std, w, b = fit_logreg(x[train], y[train], n_classes, l2, cfg.max_iter)
        out[held] = ((x[held] - mean) / std) @ w.T + b  # (n_held, C)
    return out


def fit_classifier(
    x: np.ndarray, y: np.ndarray, classes: list[str], cfg: ClassifierConfig | None = None
) -> LinearClassifier:
    """Pick L2 by CV log-loss, fit the temperature on out-of-fold logits, refit on everything."""
    cfg = cfg or ClassifierConfig()
    n_classes = len(classes)
    assert x.ndim == 2 and len(x) == len(y), f"features {x.shape} vs labels {len(y)}"
    counts = np.bincount(y, minlength=n_classes)
    if counts.min() < cfg.n_folds:
        raise ValueError(
            f"need >= {cfg.n_folds} examples per route to fit, got {dict(zip(classes, counts.tolist(), strict=True))}"
        )
    best: tuple[float, float, np.ndarray] | None = None
    for l2 in cfg.l2_grid:
        oof = _oof_logits(x, y, n_classes, l2, cfg)
        nll = float(-np.log(softmax(oof)[np.arange(len(y)), y] + 1e-12).mean())
        log.info("l2=%g: out-of-fold NLL %.4f acc %.3f", l2, nll, (oof.argmax(1) == y).mean())
        if best is None or nll < best[1]:
            best = (l2, nll, oof)
    assert best is not None, "l2_grid must not be empty"
    l2, _, oof = best
    temperature = fit_temperature(oof, y)
    mean, std, w, b = fit_logreg(x, y, n_classes, l2, cfg.max_iter)
    report = {
        "n_train": len(y),
        "l2": l2,
        "temperature": temperature,
        "cv_accuracy": float((oof.argmax(1) == y).mean()),
        "cv_ece_uncalibrated": expected_calibration_error(softmax(oof), y),
        "cv_ece_calibrated": expected_calibration_error(softmax(oof / temperature), y),
    }
    log.info("router classifier fit: %s", report)
    return LinearClassifier(
        classes=list(classes),
        mean=mean,
        std=std,
        weight=w,
        bias=b,
        temperature=temperature,
        meta={"fit": report},
    )
