"""Lexical tokenizer for BM25: keeps what exact lookup needs.

Unlike bm25s's default (``\\b\\w\\w+\\b`` + English stopwords) nothing is dropped: one-character
tokens ("7", "x"), numbers ("3.14", "1,000"), IDs ("INV-2024-001"), UUIDs and code identifiers
("snake_case", "pkg.module.fn", "getUserName") all survive. Text is lower-cased (NFKC-normalised);
a compound token (alphanumeric runs joined by ``- _ . : / ,`` without spaces) is emitted whole *and*
as its alphanumeric parts, so "INV-2024-001" matches both the exact ID and a query for "2024".
The same function tokenizes documents and queries.
"""

from __future__ import annotations

import re
import unicodedata

# A run of letters/digits, optionally joined to further runs by one connector character.
# \w includes "_", so snake_case identifiers are already one run; the parts split below.
_COMPOUND = re.compile(r"\w+(?:[-.:/,@]\w+)*")
_PARTS = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased lexical tokens of ``text``: each compound token followed by its parts (if any)."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    out: list[str] = []
    for tok in _COMPOUND.findall(text.lower()):
        out.append(tok)
        if not tok.isalnum():  # has connectors or "_": add the pieces too
            out.extend(p for p in _PARTS.findall(tok) if p != tok)
    return out
