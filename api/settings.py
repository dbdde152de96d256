"""Service settings, read from the environment (prefix ``TTT_RAG_``) by pydantic-settings.

This is the only module of the project that reads environment variables; everything else receives a
:class:`Settings` instance from :func:`api.main.create_app`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class Settings(BaseSettings):
    """Everything ``ttt-rag serve`` can be told. Limits protect the model from oversized work."""

    model_config = SettingsConfigDict(env_prefix="TTT_RAG_", env_ignore_empty=True, extra="ignore")

    # None = HybridRAG's default shipped model (a random `debug` model until a reference one exists).
    model_dir: Path | None = None
    store_dir: Path = Path("ttt-rag-store")
    # Ingest job records; default ``<store_dir>/jobs`` (retrieval and hybrid never write there).
    jobs_dir: Path | None = None
    # Comma-separated bearer keys; empty = auth off (logged as a warning at start-up).
    api_keys: str = ""
    # Name served by /v1/models and accepted as `model` by /v1/chat/completions.
    model_name: str = "ttt-rag"

    max_body_bytes: int = Field(default=8 * 2**20, ge=1024, description="request bodies above -> 413")
    max_question_chars: int = Field(default=4000, ge=1, description="longer questions -> 422")
    max_tokens_limit: int = Field(default=512, ge=1, description="max_tokens above -> 422")
    default_max_tokens: int = Field(default=64, ge=1)
    max_top_k: int = Field(default=50, ge=1)
    max_documents_per_request: int = Field(default=1000, ge=1)

    workers: int = Field(default=2, ge=1, description="threads running model work")
    queue_size: int = Field(default=8, ge=0, description="requests waiting for a worker; beyond -> 503")
    ingest_queue_size: int = Field(default=16, ge=1, description="pending ingest jobs; beyond -> 503")
    request_timeout_s: float = Field(default=120.0, gt=0, description="model work longer -> 504")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After sent with 503")

    @field_validator("api_keys")
    @classmethod
    def _strip_keys(cls, v: str) -> str:
        return ",".join(k.strip() for k in v.split(",") if k.strip())

    @property
    def keys(self) -> tuple[str, ...]:
        """The accepted bearer keys (empty = authentication disabled)."""
        return tuple(k for k in self.api_keys.split(",") if k)

    @property
    def resolved_jobs_dir(self) -> Path:
        return self.jobs_dir if self.jobs_dir is not None else self.store_dir / "jobs"
