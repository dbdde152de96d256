"""Question router: comprehension (TTT memory) vs lookup (retrieval) vs fused, with calibrated confidence.

from router import Router
Router.load_default().route("What are the main themes?")  # RouteDecision(route='comprehension', ...)
"""

from router.model import ClassifierConfig, LinearClassifier, expected_calibration_error
from router.router import ROUTES, RouteDecision, Router, RouterConfig, Rule, load_examples

__all__ = [
    "ROUTES",
    "ClassifierConfig",
    "LinearClassifier",
    "RouteDecision",
    "Router",
    "RouterConfig",
    "Rule",
    "expected_calibration_error",
    "load_examples",
]
