"""Tokenizer: exact round trip on arbitrary Unicode, byte-level ids vs raw UTF-8 bytes, specials, save/load.

Run: .venv/bin/python -m pytest -q tests/test_tokenizer.py
"""

from __future__ import annotations

import random

import pytest

from ttt.tokenizer import SPECIAL_TOKENS, Tokenizer

_CORPUS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom.\n\n" * 3,
    "The quick brown fox jumps over the lazy dog. 1234567 is a number.\n  Indented line\ttab.\n" * 3,
    "Über café naïve — “quoted” ‘single’ … 日本語のテキスト 🤖🚀\r\n" * 3,
]


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(_CORPUS * 20, vocab_size=400)


def test_byte_level_ids_are_utf8_bytes_offset_by_specials() -> None:
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 260 <= 512
    s = "naïve 🤖\n<|eos|>"
    assert tok.encode(s) == [b + len(SPECIAL_TOKENS) for b in s.encode("utf-8")]
    assert tok.encode(s, add_bos=True)[0] == tok.bos_id == 0
    assert (tok.eos_id, tok.pad_id, tok.sep_id) == (1, 2, 3)


@pytest.mark.parametrize("kind", ["byte", "trained"])
def test_round_trip_arbitrary_unicode(kind: str, trained: Tokenizer) -> None:
    tok = Tokenizer.byte_level() if kind == "byte" else trained
    rng = random.Random(0)
    samples = [_random_unicode(rng, rng.randint(0, 200)) for _ in range(200)] + _CORPUS
    samples += ["", " ", "\n\n\n", "  leading and trailing  ", "<|bos|>x<|sep|>", "\x00\x01\ufeff"]
    for s in samples:
        assert tok.decode(tok.encode(s)) == s, f"round trip failed for {s!r}"


def test_special_text_in_documents_is_not_a_special_id(trained: Tokenizer) -> None:
    ids = trained.encode("a <|eos|> b <|sep|>")
    assert not set(ids) & {0, 1, 2, 3}, "special-token text in user input must not map to special ids"
    assert trained.decode([trained.bos_id, *trained.encode("hi"), trained.eos_id]) == "hi"
    assert trained.decode([trained.bos_id, *trained.encode("hi")], skip_special=False) == "<|bos|>hi"


def test_trained_bpe_compresses_and_reloads_identically(trained: Tokenizer, tmp_path) -> None:
    text = _CORPUS[0]
    assert trained.vocab_size == 400
    assert len(trained.encode(text)) < 0.5 * len(text.encode()), "BPE should merge frequent byte pairs"
    trained.save(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.sha256() == trained.sha256()
    assert again.encode(_CORPUS[2]) == trained.encode(_CORPUS[2])
    assert Tokenizer.byte_level().sha256() != trained.sha256()


def test_bad_inputs_raise_specific_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 260"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="uint16"):
        Tokenizer.train(["abc"], vocab_size=70000)
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="expects str"):
        Tokenizer.byte_level().encode(b"bytes")  # type: ignore[arg-type]
