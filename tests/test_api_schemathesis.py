"""Property-based fuzzing of the whole API from its own ``/openapi.json`` (schemathesis, bounded
examples) against the REAL HybridRAG: zero 5xx, every status code documented, every response matching
its schema and content type.

Run: .venv/bin/python -m pytest -q tests/test_api_schemathesis.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from test_api_support import AUTH, make_rag, settings_for  # noqa: E402

from api.main import create_app  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _rag_factory():
    """Built inside the app's lifespan, i.e. when the first case runs, not at collection."""
    import tempfile
    from pathlib import Path

    rag = make_rag(Path(tempfile.mkdtemp(prefix="ttt-rag-schemathesis-")))
    rag.ingest([("seed", "The lighthouse code is 7731. Apples grow in the orchard.")])
    return rag


_store = Path(tempfile.mkdtemp(prefix="ttt-rag-schemathesis-jobs-"))
_app = create_app(settings_for(_store, ingest_queue_size=64), _rag_factory)
# The schema the app serves at /openapi.json, loaded without starting the app (like from_asgi does,
# minus the request), so collection stays cheap; the lifespan starts with the first case.
schema = schemathesis.openapi.from_dict(json.loads(json.dumps(_app.openapi())))
schema.app, schema.location = _app, "/openapi.json"


@pytest.fixture(scope="module", autouse=True)
def _stop_lifespans():
    yield
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()  # the app's lifespan shutdown: drains its pools


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_schema(case) -> None:
    if case.path == "/v1/chat/completions" and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "ttt-rag"  # the served name, so generated chats reach the model (not only 404)
    case.call_and_validate(headers=AUTH, checks=CHECKS)


@schema.parametrize()
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_without_key_never_5xx(case) -> None:
    case.call_and_validate(checks=CHECKS)
