"""Prometheus metrics and the ASGI middleware that records them, enforces the body limit and logs.

Every app gets its own ``CollectorRegistry`` so several apps (tests) never collide.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("api.access")

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ttt_rag_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "ttt_rag_request_latency_seconds",
            "HTTP request latency (until the response body is complete)",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.worker_queue = Gauge(
            "ttt_rag_worker_queue_depth", "model calls running or waiting", registry=self.registry
        )
        self.ingest_queue = Gauge(
            "ttt_rag_ingest_queue_depth", "ingest jobs running or waiting", registry=self.registry
        )
        self.rejected = Counter(
            "ttt_rag_rejected",
            "requests refused because the server was saturated",
            ["route"],
            registry=self.registry,
        )
        self.memory_version = Gauge(
            "ttt_rag_memory_version", "version of the store / TTT corpus memory", registry=self.registry
        )
        self.documents = Gauge("ttt_rag_documents", "documents in the store", registry=self.registry)


async def _send_json(send: Callable[..., Any], status: int, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


class ServiceMiddleware:
    """Request id, body-size limit (413), access log (JSON fields) and Prometheus metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": 500}

        async def send_wrapped(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                msg["headers"] = [*msg.get("headers", []), (b"x-request-id", rid.encode())]
            await send(msg)

        try:
            receive2 = await self._limited_receive(scope, receive)
            if receive2 is None:
                await _send_json(
                    send_wrapped,
                    413,
                    {
                        "detail": f"request body exceeds the limit of {self.max_body} bytes "
                        "(TTT_RAG_MAX_BODY_BYTES)"
                    },
                )
            else:
                await self.app(scope, receive2, send_wrapped)
        finally:
            self._record(scope, status["code"], time.perf_counter() - t0, rid)

    async def _limited_receive(self, scope: Scope, receive: Callable[..., Any]) -> Callable[..., Any] | None:
        """``receive`` unchanged when the declared length fits; the buffered body when no length is
        declared and it fits; None when the body is too large."""
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return None
            return receive if n <= self.max_body else None
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return receive
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > self.max_body:
                return None
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body, done = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal done
            if done:
                return await receive()
            done = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    def _record(self, scope: Scope, status: int, seconds: float, rid: str) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(scope["method"], path, str(status)).inc()
        self.metrics.latency.labels(path).observe(seconds)
        level = logging.ERROR if status >= 500 and status != 503 else logging.INFO
        log.log(
            level,
            "request",
            extra={
                "request_id": rid,
                "method": scope["method"],
                "path": scope.get("path"),
                "route": path,
                "status": status,
                "ms": round(seconds * 1000, 2),
            },
        )
