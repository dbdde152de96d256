"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with the project's four special tokens.

Two flavours share one class:
  - ``Tokenizer.train(texts, vocab_size)``: byte-level BPE learned from text (default 8192 ids).
  - ``Tokenizer.byte_level()``: no merges, one id per byte (260 ids); fits the engine's ``debug`` preset.

Both use the ByteLevel pre-tokenizer and decoder with no normalizer, so ``decode(encode(s)) == s`` for any
Unicode string. Special-token text written inside user input (e.g. the literal string ``"<|eos|>"``) is
encoded as ordinary bytes, never as the special id, so documents cannot inject separators.
Ids 0..3 are always ``<|bos|> <|eos|> <|pad|> <|sep|>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

BOS, EOS, PAD, SEP = "<|bos|>", "<|eos|>", "<|pad|>", "<|sep|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SEP)
TOKENIZER_FILE = "tokenizer.json"


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (the alphabet of the ByteLevel pre-tokenizer)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def _configure(tk: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    tk.normalizer = None  # exact round trip: no NFC/NFKC
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = None
    tk.encode_special_tokens = True  # "<|eos|>" typed in a document is plain text, not the special id
    return tk


class Tokenizer:
    """Thin typed wrapper over ``tokenizers.Tokenizer``; ids 0..3 are bos, eos, pad, sep."""

    def __init__(self, tk: tokenizers.Tokenizer) -> None:
        self._tk = _configure(tk)
        for i, name in enumerate(SPECIAL_TOKENS):
            got = self._tk.token_to_id(name)
            if got != i:
                raise ValueError(f"tokenizer must map {name} to id {i}, got {got}")

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def byte_level(cls) -> Tokenizer:
        """Untrained fallback: 4 specials + 256 byte tokens (ids 4..259), no merges."""
        vocab = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
        for b, ch in _byte_to_unicode().items():
            vocab[ch] = len(SPECIAL_TOKENS) + b
        tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tk.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(tk)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
        """Learn byte-level BPE merges from ``texts`` (an iterable, streamed)."""
        n_base = len(SPECIAL_TOKENS) + 256
        if vocab_size < n_base:
            raise ValueError(f"vocab_size must be >= {n_base} (4 specials + 256 bytes), got {vocab_size}")
        if vocab_size > 65535:
            raise ValueError(f"vocab_size must fit uint16 token shards (<= 65535), got {vocab_size}")
        tk = _configure(tokenizers.Tokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        log.info("trained byte-level BPE: %d ids", tk.get_vocab_size())
        return cls(tk)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Load ``directory/tokenizer.json`` (a model checkpoint dir or a data dir)."""
        return cls.from_file(Path(directory) / TOKENIZER_FILE)

    # ---- use --------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (Rust threads); same ids as ``encode`` on each."""
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json; a directory path gets ``path/tokenizer.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(path))

    def to_json(self) -> str:
        return self._tk.to_str()

    def sha256(self) -> str:
        """Content hash of vocab + merges (stable across saves); shards record it."""
        model = json.loads(self._tk.to_str())["model"]
        blob = json.dumps({"vocab": model["vocab"], "merges": model["merges"]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size()

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def pad_id(self) -> int:
        return 2

    @property
    def sep_id(self) -> int:
        return 3

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
