"""Router accuracy, confusion matrix and calibration (ECE) on the held-out split of the labelled set.

    python -m eval.router_eval                    # shipped router, shipped test split
    ttt-rag eval router --router-dir DIR --data FILE.jsonl

Writes eval/results/router_eval.json (run metadata + metrics) and prints a markdown table.
Accuracy counts the *final* route (after the low-confidence fallback); ECE is measured on the
classifier's calibrated probabilities (top label, 10 equal-width bins), before the fallback.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import run_metadata, write_results
from router import ROUTES, Router, expected_calibration_error, load_examples
from router.model import softmax

log = logging.getLogger(__name__)


def evaluate_router(router: Router, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Metrics of ``router`` on labelled ``rows`` ({"question", "route", ...})."""
    assert rows, "no evaluation rows"
    assert router.classifier is not None, "router has no classifier"
    qs = [r["question"] for r in rows]
    y = np.asarray([ROUTES.index(r["route"]) for r in rows])
    t0 = time.perf_counter()
    decisions = router.route_batch(qs)
    secs = time.perf_counter() - t0
    probs = np.asarray([[d.scores.get(c, 0.0) for c in ROUTES] for d in decisions])  # (N, 3) calibrated
    # Uncalibrated probabilities for comparison: softmax(T * log p) == softmax(logits), no second embedding pass.
    raw = softmax(router.classifier.temperature * np.log(np.clip(probs, 1e-300, None)))
    pred = np.asarray([ROUTES.index(d.route) for d in decisions])
    conf = np.zeros((3, 3), dtype=int)  # rows: true route, cols: predicted route
    for t, p in zip(y, pred, strict=True):
        conf[t, p] += 1
    per_route = {}
    for i, c in enumerate(ROUTES):
        tp = conf[i, i]
        per_route[c] = {
            "precision": float(tp / max(conf[:, i].sum(), 1)),
            "recall": float(tp / max(conf[i].sum(), 1)),
            "support": int(conf[i].sum()),
        }
    errors = [
        {"question": q, "true": ROUTES[t], "pred": d.route, "confidence": round(d.confidence, 3)}
        for q, t, d in zip(qs, y, decisions, strict=True)
        if ROUTES[t] != d.route
    ]
    return {
        "n": len(rows),
        "accuracy": float((pred == y).mean()),
        "classifier_accuracy": float((probs.argmax(1) == y).mean()),  # before the fallback
        "ece": expected_calibration_error(probs, y),
        "ece_uncalibrated": expected_calibration_error(raw, y),
        "fallback_rate": float(np.mean([d.fallback for d in decisions])),
        "confusion_matrix": {"labels": list(ROUTES), "rows_true_cols_pred": conf.tolist()},
        "per_route": per_route,
        "ms_per_question": 1000 * secs / len(rows),
        "errors": errors,
    }


def markdown(metrics: dict[str, Any]) -> str:
    """Summary line + confusion matrix as a markdown table."""
    labels = metrics["confusion_matrix"]["labels"]
    rows = metrics["confusion_matrix"]["rows_true_cols_pred"]
    lines = [
        f"router held-out: n={metrics['n']} accuracy={metrics['accuracy']:.3f} "
        f"(classifier {metrics['classifier_accuracy']:.3f}) ECE={metrics['ece']:.3f} "
        f"(uncalibrated {metrics['ece_uncalibrated']:.3f}) fallback={metrics['fallback_rate']:.3f}",
        "",
        "| true \\ predicted | " + " | ".join(labels) + " | recall |",
        "|---|" + "---|" * (len(labels) + 1),
    ]
    for lab, row in zip(labels, rows, strict=True):
        rec = metrics["per_route"][lab]["recall"]
        lines.append(f"| {lab} | " + " | ".join(str(v) for v in row) + f" | {rec:.2f} |")
    prec = " | ".join(f"{metrics['per_route'][lab]['precision']:.2f}" for lab in labels)
    lines.append(f"| precision | {prec} | |")
    return "\n".join(lines)


def run(
    router_dir: Path | None = None, data: Path | None = None, split: str = "test", out_dir: Path | None = None
) -> dict[str, Any]:
    """Evaluate, write eval/results/router_eval.json, return the payload."""
    router = Router.load(router_dir) if router_dir else Router.load_default()
    rows = load_examples(data, split=split)
    if not rows:
        raise ValueError(f"no rows with split={split!r} in {data or 'the shipped set'}")
    metrics = evaluate_router(router, rows)
    assert router.classifier is not None
    config = {
        "router_dir": str(router_dir or "router/data (shipped)"),
        "data": str(data or "router/data/router_examples.jsonl"),
        "split": split,
        "confidence_threshold": router.config.confidence_threshold,
        "fallback_route": router.config.fallback_route,
        "fit": router.classifier.meta.get("fit", {}),
    }
    seed = router.config.classifier.seed
    payload = {**run_metadata(config, seed), "sizes": {"n_eval": len(rows)}, "metrics": metrics}
    path = write_results("router_eval", payload, out_dir)
    payload["path"] = str(path)
    payload["markdown"] = markdown(metrics)
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    result = run()
    print(result["markdown"])  # noqa: T201 - script output
