"""Hybrid RAG: TTT corpus memory + exact retrieval, routed per question.

``from hybrid import HybridRAG, Answer``. Importing this package is cheap: torch, the engine and the
index load when ``hybrid.rag`` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hybrid.errors import (
    CorruptMemoryError,
    EmptyQuestionError,
    HybridError,
    InvalidDocumentsError,
    InvalidQuestionError,
    NotIngestedError,
    QuestionTooLongError,
    UnknownRouteError,
)
from hybrid.reader import ReaderConfig, Source

if TYPE_CHECKING:
    from hybrid.rag import Answer, HybridConfig, HybridRAG, IngestReport

__all__ = [
    "Answer",
    "CorruptMemoryError",
    "EmptyQuestionError",
    "HybridConfig",
    "HybridError",
    "HybridRAG",
    "IngestReport",
    "InvalidDocumentsError",
    "InvalidQuestionError",
    "NotIngestedError",
    "QuestionTooLongError",
    "ReaderConfig",
    "Source",
    "UnknownRouteError",
]

_LAZY = {"Answer", "HybridConfig", "HybridRAG", "IngestReport"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # hybrid.rag imports torch: load it on first use only
        from hybrid import rag

        return getattr(rag, name)
    raise AttributeError(f"module 'hybrid' has no attribute {name!r}")
