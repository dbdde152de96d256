"""Retrieval layer: chunking, BM25 (rank-bm25 BM25Okapi parity), dense FAISS, RRF fusion, durable store.

Importing this package is cheap: numpy only; scipy/faiss/sentence-transformers load on first use.
"""

from .chunker import Chunk, ChunkerConfig, chunk_text, iter_chunks
from .errors import (
    CorruptIndexError,
    DenseUnavailableError,
    DocumentNotFoundError,
    DuplicateDocumentError,
    EmptyDocumentError,
    EmptyQueryError,
    IndexExistsError,
    IndexNotFoundError,
    InvalidDocumentIdError,
    InvalidInputError,
    InvalidUTF8Error,
    QueryTooLongError,
    RetrievalError,
    StoreLockedError,
    UnknownModeError,
)
from .index import DocumentInfo, Index, IndexConfig, SearchHit

__all__ = [
    "Chunk",
    "ChunkerConfig",
    "CorruptIndexError",
    "DenseUnavailableError",
    "DocumentInfo",
    "DocumentNotFoundError",
    "DuplicateDocumentError",
    "EmptyDocumentError",
    "EmptyQueryError",
    "Index",
    "IndexConfig",
    "IndexExistsError",
    "IndexNotFoundError",
    "InvalidDocumentIdError",
    "InvalidInputError",
    "InvalidUTF8Error",
    "QueryTooLongError",
    "RetrievalError",
    "SearchHit",
    "StoreLockedError",
    "UnknownModeError",
    "chunk_text",
    "iter_chunks",
]
