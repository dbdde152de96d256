"""Exceptions raised by ``hybrid``: every one subclasses ``HybridError``.

Bad input also subclasses ``ValueError`` (the API maps those to HTTP 4xx); state problems subclass
``RuntimeError``. Nothing stored is changed when one of these is raised.
"""

from __future__ import annotations


class HybridError(Exception):
    """Base class of every error raised by ``hybrid``."""


class InvalidQuestionError(HybridError, ValueError):
    """The question cannot be answered as given."""


class EmptyQuestionError(InvalidQuestionError):
    """The question is empty or whitespace only."""


class QuestionTooLongError(InvalidQuestionError):
    """The question (with the prompt around it) does not fit in the model's window / prompt budget."""


class UnknownRouteError(HybridError, ValueError):
    """``route=`` is not one of 'auto', 'comprehension', 'lookup', 'fused'."""


class InvalidDocumentsError(HybridError, ValueError):
    """``ingest``/``delete`` got documents or ids of the wrong type, empty, or duplicated."""


class NotIngestedError(HybridError, RuntimeError):
    """An answer was asked for before any document was ingested (or after all were deleted)."""


class CorruptMemoryError(HybridError, RuntimeError):
    """A corpus-memory snapshot is missing, truncated or fails its checksum; the message names the file."""
