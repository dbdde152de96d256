"""`Router`: question -> `RouteDecision(route, confidence, reason)`.

Order of precedence (semantic-router's threshold/fallback model, Haystack's first-match rules):
1. user rules (regex -> route), first match wins, confidence 1.0, the reason names the rule;
2. the trained classifier over [MiniLM embedding, rule signals], temperature-calibrated;
3. if the calibrated confidence is below the route's threshold, fall back to ``fallback_route``
   (default ``fused``: it runs both memory and retrieval, the safe choice when unsure).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from router.features import FEATURE_NAMES, active_signals, rule_features
from router.model import ClassifierConfig, LinearClassifier, fit_classifier

log = logging.getLogger(__name__)

ROUTES: tuple[str, ...] = ("comprehension", "lookup", "fused")
DEFAULT_DIR = Path(__file__).resolve().parent / "data"
MAX_QUESTION_CHARS = 8192


class TextEncoder(Protocol):
    """What the router needs from an embedder (``retrieval.embedder.Embedder`` satisfies it)."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class RouteDecision:
    route: str  # one of ROUTES
    confidence: float  # calibrated probability of the classifier's top route (1.0 for a rule match)
    reason: str  # short human string naming the signals
    scores: dict[str, float] = field(default_factory=dict)  # calibrated probability per route
    rule: str | None = None  # name of the rule that decided, if any
    fallback: bool = False  # True when confidence was below threshold and fallback_route was used

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Rule:
    """``pattern`` (regex, searched case-insensitively) -> ``route``. Rules take precedence over the model."""

    pattern: str | re.Pattern[str]
    route: str
    name: str | None = None

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"rule route must be one of {ROUTES}, got {self.route!r}")
        try:
            compiled = re.compile(self.pattern, re.I) if isinstance(self.pattern, str) else self.pattern
        except re.error as e:
            raise ValueError(f"invalid rule regex {self.pattern!r}: {e}") from e
        object.__setattr__(self, "pattern", compiled)
        if self.name is None:
            object.__setattr__(self, "name", compiled.pattern)


@dataclass(kw_only=True)
class RouterConfig:
    confidence_threshold: float = 0.5  # below this calibrated confidence, use fallback_route
    route_thresholds: dict[str, float] = field(default_factory=dict)  # per-route override of the above
    fallback_route: str = "fused"
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self) -> None:
        if self.fallback_route not in ROUTES:
            raise ValueError(f"fallback_route must be one of {ROUTES}, got {self.fallback_route!r}")
        for r, t in {"*": self.confidence_threshold, **self.route_thresholds}.items():
            if r != "*" and r not in ROUTES:
                raise ValueError(f"route_thresholds key {r!r} is not one of {ROUTES}")
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold for {r!r} must be in [0, 1], got {t}")

    def threshold(self, route: str) -> float:
        return self.route_thresholds.get(route, self.confidence_threshold)


def _check_question(q: object) -> str:
    if not isinstance(q, str):
        raise TypeError(f"question must be a str, got {type(q).__name__}")
    if not q.strip():
        raise ValueError("question is empty")
    if len(q) > MAX_QUESTION_CHARS:
        raise ValueError(f"question is {len(q)} chars; the router accepts at most {MAX_QUESTION_CHARS}")
    return q


def _as_rules(rules: Iterable[Rule | tuple[str, str] | tuple[str, str, str]] | None) -> list[Rule]:
    out = []
    for r in rules or []:
        out.append(r if isinstance(r, Rule) else Rule(*r))
    return out


def _parse_examples(examples: Iterable[Mapping[str, str] | tuple[str, str]]) -> tuple[list[str], list[str]]:
    qs, routes = [], []
    for i, ex in enumerate(examples):
        q, r = (ex["question"], ex["route"]) if isinstance(ex, Mapping) else ex
        try:
            _check_question(q)
        except (TypeError, ValueError) as e:
            raise type(e)(f"example {i}: {e}") from e
        if r not in ROUTES:
            raise ValueError(f"example {i}: route must be one of {ROUTES}, got {r!r}")
        qs.append(q)
        routes.append(r)
    if not qs:
        raise ValueError("no training examples")
    return qs, routes


def load_examples(path: str | Path | None = None, split: str | None = None) -> list[dict[str, str]]:
    """Rows of a labelled JSONL set (default: the shipped one), optionally only one ``split``."""
    p = Path(path) if path else DEFAULT_DIR / "router_examples.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


class Router:
    """Routes questions to ``comprehension`` (TTT memory), ``lookup`` (retrieval) or ``fused`` (both)."""

    def __init__(
        self,
        classifier: LinearClassifier | None = None,
        *,
        config: RouterConfig | None = None,
        rules: Iterable[Rule | tuple[str, str] | tuple[str, str, str]] | None = None,
        embedder: TextEncoder | None = None,
    ) -> None:
        self.config = config or RouterConfig()
        self.rules = _as_rules(rules)
        self.classifier = classifier
        self._embedder = embedder
        self._lock = threading.Lock()  # lazy embedder load is shared by concurrent route() calls
        if classifier is not None:
            assert set(classifier.classes) == set(ROUTES), (
                f"classifier classes {classifier.classes} != {ROUTES}"
            )

    # ------------------------------------------------------------------ features
    @property
    def embedder(self) -> TextEncoder:
        with self._lock:
            if self._embedder is None:
                self._embedder = self._default_embedder()
        return self._embedder

    @staticmethod
    def _default_embedder() -> TextEncoder:
        try:
            from retrieval.embedder import Embedder
        except ImportError as e:
            raise ImportError(
                f"the router's embedding classifier needs: pip install 'ttt-rag[retrieval]' ({e})"
            ) from e
        return Embedder.default()

    def features(self, questions: list[str]) -> np.ndarray:
        """(N, 384 + F): L2-normalised sentence embedding, then the rule signals."""
        emb = np.asarray(self.embedder.encode(list(questions)), dtype=np.float32)  # (N, E)
        assert emb.ndim == 2 and len(emb) == len(questions), f"embedder returned {emb.shape}"
        return np.concatenate([emb, rule_features(questions)], axis=1)

    # ------------------------------------------------------------------ routing
    def route(self, question: str) -> RouteDecision:
        return self.route_batch([question])[0]

    def route_batch(self, questions: Sequence[str]) -> list[RouteDecision]:
        """Decisions for many questions with one embedding call."""
        if isinstance(questions, str):
            raise TypeError("route_batch takes a list of questions; use route() for one")
        qs = [_check_question(q) for q in questions]
        out: list[RouteDecision | None] = [self._match_rule(q) for q in qs]
        todo = [i for i, d in enumerate(out) if d is None]
        if todo:
            if self.classifier is None:
                raise RuntimeError(
                    "router has no trained classifier: use Router.load_default(), load() or fit()"
                )
            probs = self.classifier.predict_proba(self.features([qs[i] for i in todo]))  # (n, C)
            for i, p in zip(todo, probs, strict=True):
                out[i] = self._decide(qs[i], p)
        return [d for d in out if d is not None]

    def _match_rule(self, q: str) -> RouteDecision | None:
        for rule in self.rules:
            assert isinstance(rule.pattern, re.Pattern)
            if rule.pattern.search(q):
                return RouteDecision(
                    rule.route, 1.0, f"rule '{rule.name}' matched", {rule.route: 1.0}, rule.name
                )
        return None

    def _decide(self, q: str, p: np.ndarray) -> RouteDecision:
        assert self.classifier is not None
        scores = {c: float(v) for c, v in zip(self.classifier.classes, p, strict=True)}
        top = max(scores, key=scores.__getitem__)
        conf = scores[top]
        signals = active_signals(q)
        sig = f"; signals: {', '.join(signals)}" if signals else "; no rule signals"
        thr = self.config.threshold(top)
        if conf < thr:
            fb = self.config.fallback_route
            reason = f"low confidence ({top} {conf:.2f} < threshold {thr:.2f}), fell back to {fb}{sig}"
            return RouteDecision(fb, conf, reason, scores, None, fallback=True)
        return RouteDecision(top, conf, f"classifier: {top} {conf:.2f}{sig}", scores)

    # ------------------------------------------------------------------ training and persistence
    def fit(self, examples: Iterable[Mapping[str, str] | tuple[str, str]]) -> dict[str, Any]:
        """Train the classifier on (question, route) pairs or {"question", "route"} dicts; returns the fit report."""
        qs, routes = _parse_examples(examples)
        y = np.asarray([ROUTES.index(r) for r in routes])
        clf = fit_classifier(self.features(qs), y, list(ROUTES), self.config.classifier)
        clf.meta["features"] = {"embedding_dim": clf.dim - len(FEATURE_NAMES), "rule_features": FEATURE_NAMES}
        clf.meta["embedder"] = getattr(self.embedder, "name", type(self.embedder).__name__)
        self.classifier = clf
        return clf.meta["fit"]

    def save(self, directory: str | Path) -> None:
        """Write router.safetensors + router.json (classifier, config and rules) to ``directory``."""
        if self.classifier is None:
            raise RuntimeError("nothing to save: the router has no classifier (call fit() first)")
        cfg = asdict(self.config)
        self.classifier.meta["router_config"] = cfg
        self.classifier.meta["rules"] = [[r.pattern.pattern, r.route, r.name] for r in self.rules]  # type: ignore[union-attr]
        self.classifier.save(directory)

    @classmethod
    def load(cls, directory: str | Path, *, embedder: TextEncoder | None = None, **overrides: Any) -> Router:
        """Load a saved router; ``config=``/``rules=`` in overrides replace the saved ones."""
        clf = LinearClassifier.load(directory)
        saved = dict(clf.meta.get("router_config", {}))
        if "classifier" in saved:
            saved["classifier"] = ClassifierConfig(
                **{**saved["classifier"], "l2_grid": tuple(saved["classifier"]["l2_grid"])}
            )
        config = overrides.pop("config", None) or RouterConfig(**saved)
        rules = overrides.pop("rules", None)
        if rules is None:
            rules = [Rule(p, r, n) for p, r, n in clf.meta.get("rules", [])]
        if overrides:
            raise TypeError(f"unknown Router.load arguments: {sorted(overrides)}")
        return cls(clf, config=config, rules=rules, embedder=embedder)

    @classmethod
    def load_default(cls, *, embedder: TextEncoder | None = None, **overrides: Any) -> Router:
        """The shipped router (router/data/router.safetensors), trained by ``python -m router.train_default``."""
        return cls.load(DEFAULT_DIR, embedder=embedder, **overrides)
