"""Exceptions raised by the retrieval layer: every one subclasses ``RetrievalError``.

Input problems also subclass ``ValueError`` and missing stores ``FileNotFoundError``, so callers that
catch the builtin types keep working; the API layer maps ``InvalidInputError`` to HTTP 4xx.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class of every error raised by ``retrieval``."""


class InvalidInputError(RetrievalError, ValueError):
    """The caller passed something the index cannot accept (nothing stored was changed)."""


class EmptyDocumentError(InvalidInputError):
    """A document is empty or whitespace only."""


class InvalidUTF8Error(InvalidInputError):
    """A document (or query) is not valid UTF-8 (undecodable bytes or lone surrogates)."""


class DuplicateDocumentError(InvalidInputError):
    """The same document id appears more than once in one ``add`` call."""


class InvalidDocumentIdError(InvalidInputError):
    """A document id is not a non-empty string of printable characters."""


class EmptyQueryError(InvalidInputError):
    """A query is empty or whitespace only."""


class QueryTooLongError(InvalidInputError):
    """A query is longer than ``IndexConfig.max_query_chars``."""


class UnknownModeError(InvalidInputError):
    """``search(mode=...)`` got a mode other than 'hybrid', 'bm25' or 'dense'."""


class DenseUnavailableError(InvalidInputError):
    """Dense search was asked of an index created with ``dense=False``."""


class IndexNotFoundError(RetrievalError, FileNotFoundError):
    """``Index.open`` found no index (no manifest) in the store directory."""


class IndexExistsError(RetrievalError, FileExistsError):
    """``Index.create`` found an index already present in the store directory."""


class CorruptIndexError(RetrievalError):
    """An index file is missing, truncated or unreadable; the message names the file."""


class StoreLockedError(RetrievalError):
    """Another process holds the store's writer lock."""


class DocumentNotFoundError(InvalidInputError, LookupError):
    """A document id is not in the index."""
