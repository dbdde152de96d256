"""Property-based fuzzing of the whole API from its own ``/openapi.json`` (schemathesis, bounded
examples) against the REAL HybridRAG: zero 5xx, every status code documented, every response matching
its schema and content type.

Run: .venv/bin/python -m pytest -q tests/test_api_schemathesis.py
"""

from __future__ import annotations

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

_state: dict = {}


def _app():
    if "app" not in _state:
        import tempfile
        from pathlib import Path

        store = Path(tempfile.mkdtemp(prefix="ttt-rag-schemathesis-"))
        rag = make_rag(store)
        rag.ingest([("seed", "The lighthouse code is 7731. Apples grow in the orchard.")])
        _state["app"] = create_app(settings_for(store, ingest_queue_size=64), rag)
    return _state["app"]


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module", autouse=True)
def _stop_lifespans():
    yield
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_schema(case) -> None:
    case.call_and_validate(headers=AUTH, checks=CHECKS)


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_without_key_never_5xx(case) -> None:
    case.call_and_validate(checks=CHECKS)
