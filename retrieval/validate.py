"""Input validation: every check runs before anything is changed, with a specific exception."""

from __future__ import annotations

import hashlib

from .errors import (
    DuplicateDocumentError,
    EmptyDocumentError,
    EmptyQueryError,
    InvalidDocumentIdError,
    InvalidInputError,
    InvalidUTF8Error,
    QueryTooLongError,
)

MAX_DOC_ID_CHARS = 512


def _as_text(value, what: str) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidUTF8Error(f"{what} is not valid UTF-8: {e}") from e
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be str or UTF-8 bytes, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates, e.g. from surrogateescape decoding
        raise InvalidUTF8Error(f"{what} is not valid UTF-8 (unpaired surrogate): {e}") from e
    return value


def check_doc_id(doc_id) -> str:
    if not isinstance(doc_id, str) or not doc_id.strip() or not doc_id.isprintable():
        raise InvalidDocumentIdError(f"document id must be a non-empty printable string, got {doc_id!r}")
    if len(doc_id) > MAX_DOC_ID_CHARS:
        raise InvalidDocumentIdError(f"document id longer than {MAX_DOC_ID_CHARS} chars: {doc_id[:40]!r}...")
    return doc_id


def normalize_docs(docs) -> list[tuple[str, str, str]]:
    """Validate ``[(doc_id, text or bytes)]`` -> ``[(doc_id, text, sha256)]`` or raise before any change."""
    if isinstance(docs, str | bytes | tuple):
        raise InvalidInputError("add takes a list of (doc_id, text) pairs, e.g. [('doc-1', 'text')]")
    out, seen = [], set()
    for item in docs:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise InvalidInputError(f"each document must be a (doc_id, text) pair, got {item!r:.80}")
        doc_id = check_doc_id(item[0])
        text = _as_text(item[1], f"document {doc_id!r}")
        if not text.strip():
            raise EmptyDocumentError(f"document {doc_id!r} is empty")
        if doc_id in seen:
            raise DuplicateDocumentError(f"document id {doc_id!r} appears more than once in one add call")
        seen.add(doc_id)
        out.append((doc_id, text, hashlib.sha256(text.encode("utf-8")).hexdigest()))
    return out


def check_query(query, max_chars: int) -> str:
    query = _as_text(query, "query")
    if not query.strip():
        raise EmptyQueryError("query is empty")
    if len(query) > max_chars:
        raise QueryTooLongError(f"query has {len(query)} characters; the limit is {max_chars}")
    return query


def check_k(k, max_k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise InvalidInputError(f"k must be an integer in [1, {max_k}], got {k!r}")
