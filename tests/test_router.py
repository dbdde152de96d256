"""Router tests: shipped-weights accuracy/calibration on the held-out split, fit reproducibility,
save/load, fallback threshold, rule precedence, bad input, and the classifier math against references.

    .venv/bin/python -m pytest -q tests/test_router.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from router import (
    ROUTES,
    RouteDecision,
    Router,
    RouterConfig,
    Rule,
    expected_calibration_error,
    load_examples,
)
from router.features import FEATURE_NAMES, active_signals, rule_features
from router.model import fit_logreg, fit_temperature, softmax, stratified_folds

ACC_BOUND = 0.90
ECE_BOUND = 0.08  # top-label ECE, 10 bins, on the 123-question held-out split


class CachedEmbedder:
    """Real MiniLM embeddings, each question encoded once per test session."""

    def __init__(self) -> None:
        from retrieval.embedder import Embedder

        self.inner = Embedder.default(device="cpu")
        self.name = "all-MiniLM-L6-v2"
        self.cache: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small batches: one thread is faster on the shared 2-core CI box
            try:
                self.cache.update(zip(missing, self.inner.encode(missing), strict=True))
            finally:
                torch.set_num_threads(threads)
        return np.stack([self.cache[t] for t in texts])


@pytest.fixture(scope="module")
def embedder() -> CachedEmbedder:
    pytest.importorskip("sentence_transformers")
    emb = CachedEmbedder()
    emb.encode([r["question"] for r in load_examples()])  # one batch for everything below
    return emb


@pytest.fixture(scope="module")
def shipped(embedder: CachedEmbedder) -> Router:
    return Router.load_default(embedder=embedder)


@pytest.fixture(scope="module")
def test_rows() -> list[dict[str, str]]:
    return load_examples(split="test")


# ---------------------------------------------------------------- dataset
def test_dataset_is_balanced_varied_and_free_of_ruler_templates() -> None:
    rows = load_examples()
    assert len(rows) >= 400
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) >= 100
    for route in ROUTES:
        n = sum(r["route"] == route for r in rows)
        assert abs(n - len(rows) / 3) <= 0.05 * len(rows), f"{route}: {n} of {len(rows)}"
    assert len({r["question"].lower() for r in rows}) == len(rows), "duplicate questions"
    assert len({r["domain"] for r in rows}) >= 8
    text = " ".join(r["question"].lower() for r in rows)
    for template in ("special magic", "magic number", "magic uuid", "mentioned in the provided text"):
        assert template not in text, f"RULER evaluation template {template!r} leaked into the router set"


# ---------------------------------------------------------------- shipped weights
def test_shipped_router_heldout_accuracy_and_ece(shipped: Router, test_rows: list[dict[str, str]]) -> None:
    decisions = shipped.route_batch([r["question"] for r in test_rows])
    y = np.asarray([ROUTES.index(r["route"]) for r in test_rows])
    pred = np.asarray([ROUTES.index(d.route) for d in decisions])
    acc = float((pred == y).mean())
    assert acc >= ACC_BOUND, f"held-out accuracy {acc:.3f} < {ACC_BOUND}"
    probs = np.asarray([[d.scores[c] for c in ROUTES] for d in decisions])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    ece = expected_calibration_error(probs, y)
    assert ece < ECE_BOUND, f"held-out ECE {ece:.3f} >= {ECE_BOUND}"
    for d, q in zip(decisions, test_rows, strict=True):
        assert isinstance(d, RouteDecision) and d.route in ROUTES and d.reason, q


def test_ruler_style_paraphrases_route_to_lookup(shipped: Router) -> None:
    # Our own paraphrases of needle questions (the exact RULER templates are kept out of training data).
    for q in (
        "Which hidden number is tied to the word 'tranquil-river' in the passage?",
        "What uuid does the document give for the key quiet-heron?",
        "Tell me every number that the text associates with frosty-cabin.",
        "What is the secret code linked to silver-otter in the essays above?",
    ):
        d = shipped.route(q)
        assert d.route == "lookup", f"{q!r} -> {d}"


def test_fit_reproduces_shipped_weights(embedder: CachedEmbedder, shipped: Router, test_rows: list) -> None:
    # Deterministic training: refitting on the train split gives the shipped router's decisions.
    fresh = Router(embedder=embedder)
    report = fresh.fit(load_examples(split="train"))
    assert report["n_train"] == len(load_examples(split="train"))
    qs = [r["question"] for r in test_rows]
    a, b = fresh.route_batch(qs), shipped.route_batch(qs)
    assert [d.route for d in a] == [d.route for d in b]
    np.testing.assert_allclose([d.confidence for d in a], [d.confidence for d in b], atol=1e-4)


# ---------------------------------------------------------------- persistence, fallback, rules
def test_save_load_round_trip_identical(
    tmp_path, embedder: CachedEmbedder, shipped: Router, test_rows
) -> None:
    cfg = RouterConfig(confidence_threshold=0.8, route_thresholds={"lookup": 0.9})
    r1 = Router(shipped.classifier, config=cfg, rules=[(r"\bISBN\b", "lookup", "isbn")], embedder=embedder)
    r1.save(tmp_path)
    assert json.loads((tmp_path / "router.json").read_text())["meta"]["rules"] == [
        [r"\bISBN\b", "lookup", "isbn"]
    ]
    r2 = Router.load(tmp_path, embedder=embedder)
    assert r2.config == cfg
    qs = [r["question"] for r in test_rows] + ["What is the ISBN of the first edition?"]
    assert r1.route_batch(qs) == r2.route_batch(qs)  # frozen dataclasses: route, confidence, reason, scores


def test_fallback_threshold_triggers(embedder: CachedEmbedder, shipped: Router, test_rows) -> None:
    qs = [r["question"] for r in test_rows]
    base = shipped.route_batch(qs)
    thr = float(np.median([d.confidence for d in base]))
    strict = Router(
        shipped.classifier,
        config=RouterConfig(confidence_threshold=thr, fallback_route="fused"),
        embedder=embedder,
    )
    n_fallback = 0
    for d0, d in zip(base, strict.route_batch(qs), strict=True):
        assert d.scores == d0.scores and d.confidence == d0.confidence
        if d0.confidence < thr:
            n_fallback += 1
            assert d.fallback and d.route == "fused" and "fell back to fused" in d.reason, d
        else:
            assert not d.fallback and d.route == d0.route
    assert n_fallback > 0, "a median threshold must send some questions to the fallback"
    lookup_only = RouterConfig(
        confidence_threshold=0.0, route_thresholds={"lookup": 1.0}, fallback_route="comprehension"
    )
    r = Router(shipped.classifier, config=lookup_only, embedder=embedder)
    d = r.route("What is the model number of the dishwasher?")
    assert d.route == "comprehension" and d.fallback and d.scores["lookup"] == max(d.scores.values())


def test_rules_take_precedence(embedder: CachedEmbedder, shipped: Router) -> None:
    rules = [Rule(r"\bsummari[sz]e\b", "lookup", name="force-summaries"), (r"^tl;dr", "comprehension")]
    r = Router(shipped.classifier, rules=rules, embedder=embedder)
    d = r.route("Summarize the plot of the whole novel.")
    assert shipped.route("Summarize the plot of the whole novel.").route == "comprehension"
    assert d.route == "lookup" and d.confidence == 1.0 and d.rule == "force-summaries"
    assert "force-summaries" in d.reason
    assert r.route("TL;DR of these essays?").rule == "^tl;dr"
    q = "What is the default port of the server?"
    assert r.route(q) == shipped.route(q), "non-matching questions must be unaffected by rules"


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "bad, exc",
    [("", ValueError), ("   \n", ValueError), (None, TypeError), (42, TypeError), (b"why", TypeError)],
)
def test_bad_question_rejected(shipped: Router, bad: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="question"):
        shipped.route(bad)  # type: ignore[arg-type]


def test_bad_configuration_rejected(embedder: CachedEmbedder) -> None:
    with pytest.raises(ValueError, match="route must be one of"):
        Rule("x", "summary")
    with pytest.raises(ValueError, match="invalid rule regex"):
        Rule("(unclosed", "lookup")
    with pytest.raises(ValueError, match="threshold"):
        RouterConfig(confidence_threshold=1.5)
    with pytest.raises(ValueError, match="fallback_route"):
        RouterConfig(fallback_route="both")
    with pytest.raises(TypeError, match="list of questions"):
        Router.load_default(embedder=embedder).route_batch("a question")
    with pytest.raises(RuntimeError, match="no trained classifier"):
        Router(embedder=embedder).route("What is the port?")
    with pytest.raises(ValueError, match="example 1: route must be one of"):
        Router(embedder=embedder).fit([("What is it?", "lookup"), ("Why?", "reasoning")])
    with pytest.raises(ValueError, match="example 0: question is empty"):
        Router(embedder=embedder).fit([{"question": "", "route": "lookup"}])
    with pytest.raises(ValueError, match="examples per route"):
        Router(embedder=embedder).fit([("What is the port?", "lookup"), ("Summarize it.", "comprehension")])


# ---------------------------------------------------------------- classifier math vs references
def test_logreg_is_the_regularised_optimum() -> None:
    # Independent float64 numpy gradient of mean CE + l2/2 |W|^2 must vanish at the L-BFGS solution.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6)) * rng.uniform(0.5, 3, size=6) + 2.0
    y = (x[:, 0] + rng.normal(size=90) > 2).astype(int) + (x[:, 1] > 3.5)
    l2 = 0.05
    mean, std, w, b = fit_logreg(x, y, 3, l2)
    np.testing.assert_allclose(mean, x.mean(0))
    z = (x - mean) / std
    p = softmax(z @ w.T + b)
    onehot = np.eye(3)[y]
    grad_w = (p - onehot).T @ z / len(y) + l2 * w
    grad_b = (p - onehot).mean(0)
    assert np.abs(grad_w).max() < 1e-5 and np.abs(grad_b).max() < 1e-5


def test_temperature_matches_scipy_minimiser() -> None:
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 3)) * 4
    y = np.where(
        rng.uniform(size=200) < 0.7, logits.argmax(1), rng.integers(0, 3, 200)
    )  # overconfident logits

    def nll(t: float) -> float:
        return float(-np.log(softmax(logits / t)[np.arange(200), y]).mean())

    ref = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-6}).x
    t = fit_temperature(logits, y)
    assert t > 1.0, "overconfident logits need T > 1"
    assert abs(t - ref) / ref < 2e-3 and nll(t) <= nll(ref) + 1e-6


def test_ece_against_hand_computation() -> None:
    probs = np.array([[0.95, 0.05, 0.0], [0.9, 0.1, 0.0], [0.4, 0.35, 0.25], [0.1, 0.3, 0.6]])
    y = np.array([0, 1, 0, 2])
    # bins: 0.95 & 0.9 in bin 9 (acc 0.5, conf 0.925), 0.4 in bin 4 (acc 1), 0.6 in bin 6 (acc 1)
    ref = 0.5 * abs(0.5 - 0.925) + 0.25 * abs(1 - 0.4) + 0.25 * abs(1 - 0.6)
    assert expected_calibration_error(probs, y) == pytest.approx(ref)
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_stratified_folds_partition() -> None:
    y = np.array([0] * 10 + [1] * 7 + [2] * 5)
    folds = stratified_folds(y, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    for f in folds:
        assert set(np.bincount(y[f], minlength=3).tolist()) <= {1, 2}, "each class spread evenly"


def test_rule_signals() -> None:
    f = dict(
        zip(
            FEATURE_NAMES,
            rule_features(['What does "exit 3" mean for run 3f2a9c1e-7b4d-4e8a-9f10-2c6d5e7a8b9c?'])[0],
            strict=True,
        )
    )
    assert f["quoted"] == f["uuid"] == f["number"] == f["explain_cue"] == f["anchor_x_explain"] == 1.0
    assert f["anchor_no_explain"] == 0.0
    g = dict(zip(FEATURE_NAMES, rule_features(["Summarize Darcy's letters overall"])[0], strict=True))
    assert g["quoted"] == 0.0, "an apostrophe is not a quote"
    assert g["broad_cue"] == 1.0 and g["number"] == 0.0
    assert "date" in active_signals("What happened on 14 April?")
    assert "ID-like token" in active_signals("What is stored under ZX-443?")
