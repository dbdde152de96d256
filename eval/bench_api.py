"""Loopback load test of the REST service: many concurrent clients, mixed routes and ingest.

Starts ``ttt-rag serve`` in a subprocess on 127.0.0.1 (a free port), seeds a small corpus, warms up,
then runs ``--clients`` concurrent clients for ``--duration`` seconds. Each client loops over a random
mix of answer / answer-stream / chat / chat-stream / models / documents / ingest(+poll job) / metrics.
Reports p50/p99 latency per route, status counts, errors and the server's RSS before and after the load
(after warm-up, so one-time allocations do not count as growth). Writes JSON to eval/results/.

    .venv/bin/python -m eval.bench_api --clients 50 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from eval.common import run_metadata, write_results

log = logging.getLogger("bench_api")
REPO = Path(__file__).resolve().parents[1]
WORDS = "river castle lantern copper harbor meadow violin glacier orchard saddle ember quartz".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def debug_model_dir(path: Path) -> Path:
    """HybridRAG's random ``debug`` model (seeded) + byte-level tokenizer, saved (what CI and this serve)."""
    from hybrid.rag import random_debug_model
    from ttt.tokenizer import Tokenizer

    random_debug_model(seed=0).save_pretrained(path, tokenizer=Tokenizer.byte_level())
    return path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(model_dir: Path, store_dir: Path, port: int, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "TTT_RAG_API_KEYS": "bench-key", **env_extra}
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(model_dir),
        "--store",
        str(store_dir),
        "--log-level",
        "warning",
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_ready(client: Any, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("server did not become ready")


def _doc(rng: random.Random, i: int) -> dict[str, str]:
    words = " ".join(rng.choice(WORDS) for _ in range(40))
    return {
        "id": f"doc-{i}",
        "text": f"Document {i}. The secret code of item {i} is {rng.randint(0, 10**6)}. {words}",
    }


async def ingest(client: Any, docs: list[dict[str, str]], timeout: float = 120.0) -> int:
    r = await client.post("/v1/documents", json={"documents": docs})
    if r.status_code != 202:
        return r.status_code
    job = r.json()["job_id"]
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        j = await client.get(f"/v1/jobs/{job}")
        if j.json().get("status") in ("done", "failed"):
            return 200 if j.json()["status"] == "done" else 599
        await asyncio.sleep(0.1)
    return 598


async def one_request(client: Any, rng: random.Random, route: str, n_docs: list[int]) -> int:
    q = f"What is the secret code of item {rng.randrange(max(n_docs[0], 1))}?"
    if route == "answer":
        return (await client.post("/v1/answer", json={"question": q, "max_tokens": 8})).status_code
    if route == "answer_stream":
        async with client.stream(
            "POST", "/v1/answer", json={"question": q, "max_tokens": 8, "stream": True}
        ) as r:
            async for _ in r.aiter_lines():
                pass
            return r.status_code
    chat = {"model": "ttt-rag", "messages": [{"role": "user", "content": q}], "max_tokens": 8}
    if route == "chat":
        return (await client.post("/v1/chat/completions", json=chat)).status_code
    if route == "chat_stream":
        async with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            async for _ in r.aiter_lines():
                pass
            return r.status_code
    if route == "ingest":
        i = n_docs[0]
        n_docs[0] += 1
        return await ingest(client, [_doc(rng, i)])
    path = {
        "models": "/v1/models",
        "documents": "/v1/documents",
        "metrics": "/metrics",
        "healthz": "/healthz",
    }
    return (await client.get(path[route])).status_code


MIX = {
    "answer": 25,
    "answer_stream": 10,
    "chat": 20,
    "chat_stream": 10,
    "ingest": 5,
    "models": 8,
    "documents": 8,
    "metrics": 7,
    "healthz": 7,
}


async def client_loop(
    client: Any, seed: int, t_end: float, lat: dict, codes: dict, n_docs: list[int]
) -> None:
    rng = random.Random(seed)
    routes, weights = list(MIX), list(MIX.values())
    while time.monotonic() < t_end:
        route = rng.choices(routes, weights)[0]
        t0 = time.perf_counter()
        try:
            code = await one_request(client, rng, route, n_docs)
        except Exception as e:  # noqa: BLE001 - a transport error is a failed request, recorded
            code = f"{type(e).__name__}"
        lat[route].append(time.perf_counter() - t0)
        codes[route][str(code)] += 1


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


async def run(args: argparse.Namespace, model_dir: Path, store_dir: Path) -> dict[str, Any]:
    import httpx

    port = free_port()
    env = {
        "TTT_RAG_WORKERS": str(args.workers),
        "TTT_RAG_QUEUE_SIZE": str(args.queue_size),
        "TTT_RAG_INGEST_QUEUE_SIZE": str(args.clients + 8),
    }
    proc = start_server(model_dir, store_dir, port, env)
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    headers = {"Authorization": "Bearer bench-key"}
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, limits=limits, timeout=120
        ) as client:
            await wait_ready(client, proc)
            rng = random.Random(args.seed)
            assert await ingest(client, [_doc(rng, i) for i in range(args.seed_docs)]) == 200, (
                "seeding failed"
            )
            n_docs = [args.seed_docs]
            warm_lat, warm_codes = defaultdict(list), defaultdict(lambda: defaultdict(int))
            t_warm = time.monotonic() + args.warmup
            await asyncio.gather(
                *(
                    client_loop(client, 10_000 + i, t_warm, warm_lat, warm_codes, n_docs)
                    for i in range(args.clients)
                )
            )
            rss_before = rss_kib(proc.pid)
            lat, codes = defaultdict(list), defaultdict(lambda: defaultdict(int))
            t0 = time.monotonic()
            await asyncio.gather(
                *(
                    client_loop(client, args.seed + i, t0 + args.duration, lat, codes, n_docs)
                    for i in range(args.clients)
                )
            )
            elapsed = time.monotonic() - t0
            rss_after = rss_kib(proc.pid)
            metrics_text = (await client.get("/metrics")).text
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return summarize(
        args, lat, codes, elapsed, rss_before, rss_after, n_docs[0], metrics_text, proc.returncode
    )


def summarize(args, lat, codes, elapsed, rss_before, rss_after, n_docs, metrics_text, rc) -> dict[str, Any]:
    routes = {}
    for r in sorted(lat):
        routes[r] = {
            "n": len(lat[r]),
            "p50_ms": round(pct(lat[r], 0.5), 2),
            "p99_ms": round(pct(lat[r], 0.99), 2),
            "mean_ms": round(statistics.fmean(lat[r]) * 1000, 2),
            "status": dict(codes[r]),
        }
    all_codes = defaultdict(int)
    for r in codes:
        for c, n in codes[r].items():
            all_codes[c] += n
    n5xx = sum(n for c, n in all_codes.items() if c.isdigit() and int(c) >= 500)
    errors = sum(n for c, n in all_codes.items() if not c.isdigit() or int(c) >= 400)
    total = sum(all_codes.values())
    growth = (rss_after - rss_before) / rss_before
    mem_version = [ln for ln in metrics_text.splitlines() if ln.startswith("ttt_rag_memory_version ")]
    return {
        "requests": total,
        "seconds": round(elapsed, 2),
        "rps": round(total / elapsed, 1),
        "status_counts": dict(all_codes),
        "n_5xx": n5xx,
        "errors": errors,
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "rss_growth": round(growth, 4),
        "documents_at_end": n_docs,
        "memory_version_metric": mem_version[0].split()[1] if mem_version else None,
        "server_exit_code": rc,
        "routes": routes,
        "pass": {"zero_5xx": n5xx == 0, "rss_growth_below_10pct": growth < 0.10},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of measured load")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before RSS 'before'")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queue-size", type=int, default=64, help="server wait queue (>= clients: no 503)")
    p.add_argument("--seed-docs", type=int, default=20)
    p.add_argument("--model", type=Path, default=None, help="model dir (default: a random debug model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_api.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    assert args.duration <= 600 and args.clients <= 500, "bounded load only"
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        model_dir = args.model or debug_model_dir(Path(tmp) / "model")
        result = asyncio.run(run(args, model_dir, Path(tmp) / "store"))
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    cfg["model"] = str(args.model) if args.model else "random debug model (byte-level tokenizer)"
    path = write_results(
        args.out, {**run_metadata(cfg, args.seed), "sizes": {"clients": args.clients}, **result}
    )
    log.info(
        "%s", json.dumps({k: result[k] for k in ("requests", "rps", "n_5xx", "errors", "rss_growth", "pass")})
    )
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
