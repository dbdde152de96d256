"""`ttt-rag serve`: the REST service (api/) under uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @app.command()
    def serve(
        host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default)."),
        port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0 = any free port)."),
        model: Path | None = typer.Option(None, "--model", help="Model dir (default: TTT_RAG_MODEL_DIR)."),
        store: Path | None = typer.Option(None, "--store", help="Store dir (default: TTT_RAG_STORE_DIR)."),
        workers: int | None = typer.Option(None, help="Model worker threads (default: TTT_RAG_WORKERS)."),
        log_level: str = typer.Option("info", help="debug | info | warning | error."),
    ) -> None:
        """Serve the REST API (OpenAI-compatible chat, answer, documents, jobs, health, metrics)."""
        try:
            import uvicorn

            from api.logs import configure_json_logging
            from api.main import create_app
            from api.settings import Settings
        except ImportError as e:  # pragma: no cover - depends on the install
            raise typer.BadParameter(f"{e}; install the API extra: pip install 'ttt-rag[api]'") from e

        configure_json_logging(getattr(logging, log_level.upper(), logging.INFO))
        overrides = {
            k: v for k, v in {"model_dir": model, "store_dir": store, "workers": workers}.items() if v
        }
        settings = Settings(**overrides)
        try:
            if not ipaddress.ip_address(host).is_loopback:
                log.warning("binding to non-loopback address %s: put TLS and API keys in front of it", host)
        except ValueError:
            pass  # a host name
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(5, int(settings.request_timeout_s)),
        )
