"""Data pipeline: Gutenberg stripping, split by book, piece-wise encoding, shards, packing, loader, synth.

Run: .venv/bin/python -m pytest -q tests/test_data.py
``make_corpus`` / ``make_data_dir`` build a tiny fake corpus tarball; test_train and test_loss_vs_context reuse them.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from ttt.data import (
    DataConfig,
    SequenceLoader,
    TokenStream,
    build_shards,
    encode_document,
    iter_books,
    load_index,
    pack_shards,
    split_books,
    split_pieces,
    strip_gutenberg,
)
from ttt.synth import SynthConfig, synth_documents
from ttt.tokenizer import Tokenizer

_WORDS = (
    "the of and to a in that was he it his with had as for she her you not but at on him is they be by "
    "all which were said one so from have this or when there would their what an no if out into could up "
    "garden river morning letter quiet window sudden evening honest silver"
).split()
_NAMES = ["Polly", "Tom", "Margaret", "Sydney", "Fanny", "Jerome", "Alice", "Edmund"]


def fake_book(rng: random.Random, n_paragraphs: int) -> str:
    paras = []
    for _ in range(n_paragraphs):
        sents = []
        for _ in range(rng.randint(2, 5)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 18))]
            words.insert(rng.randint(2, len(words) - 1), rng.choice(_NAMES))
            s = " ".join(words)
            sents.append(s[0].upper() + s[1:] + rng.choice([".", "!", "?"]))
        paras.append("\n".join(" ".join(sents)[i : i + 70] for i in range(0, len(" ".join(sents)), 70)))
    return "\n\n".join(paras)


def _wrap_pg(body: str, title: str, old_style: bool) -> str:
    if old_style:
        head = f"The Project Gutenberg Etext of {title}\nsmall print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        tail = f"\nEnd of The Project Gutenberg Etext of {title}\nmore license text"
    else:
        head = f"The Project Gutenberg EBook of {title}\n\n*** START OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n"
        tail = f"\n\n*** END OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\nlicense text"
    return (head + body + tail).replace("\n", "\r\n")


def make_corpus(
    tmp: Path, n_books: int = 12, paragraphs: int = 12, seed: int = 0
) -> tuple[Path, dict[str, str]]:
    """Write tmp/corpus.tar.xz of fake PG books (CRLF, headers); return (path, {book id: expected body})."""
    rng = random.Random(seed)
    bodies = {}
    tar_path = tmp / "corpus" / "corpus.tar.xz"
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w:xz") as tf:
        for i in range(n_books):
            book_id = f"Author {i % 4}/Title {i}.txt"
            body = fake_book(rng, paragraphs)
            bodies[book_id] = body
            raw = _wrap_pg(body, f"Title {i}", old_style=i % 3 == 0).encode("utf-8")
            info = tarfile.TarInfo(f"corpus/{book_id}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return tar_path, bodies


def make_data_dir(tmp: Path, tok: Tokenizer | None = None, **cfg_kw) -> tuple[Path, dict[str, str]]:
    tar_path, bodies = make_corpus(tmp)
    kw = {"min_val_books": 2, "shard_tokens": 4096, **cfg_kw}
    build_shards(tar_path, tmp / "data", tok or Tokenizer.byte_level(), DataConfig(**kw))
    return tmp / "data", bodies


# ---- reading ----------------------------------------------------------------------------------------
def test_strip_gutenberg_both_marker_styles(tmp_path: Path) -> None:
    tar_path, bodies = make_corpus(tmp_path, n_books=4)
    books = list(iter_books(tar_path))
    assert [b.id for b in books] == list(bodies)
    for b in books:
        assert b.text == bodies[b.id], f"header/footer/CRLF not removed exactly for {b.id}"
    assert strip_gutenberg("no markers at all\n") == "no markers at all"


def test_real_corpus_first_books_are_stripped() -> None:
    tar = shared_path("data", "corpus", "gutenberg-top100-authors.tar.xz")
    books = list(iter_books(tar, max_books=3))
    for b in books:
        assert "\r" not in b.text and len(b.text) > 10_000
        assert "PROJECT GUTENBERG" not in b.text[:2000].upper(), b.id
        assert "PROJECT GUTENBERG" not in b.text[-2000:].upper(), b.id
    text = books[0].text[:200_000]  # real prose (curly quotes, dialogue): piecewise == whole encoding
    tok = Tokenizer.train([text], vocab_size=1000)
    assert encode_document(tok, text, piece_chars=2000).tolist() == [0, *tok.encode(text), 1]


def test_split_by_book_is_deterministic_disjoint_and_sized() -> None:
    ids = [f"Author {i % 50}/Book {i}.txt" for i in range(1000)]
    split = split_books(ids, val_frac=0.025, min_val_books=8)
    val = {b for b, s in split.items() if s == "val"}
    assert 15 <= len(val) <= 40, f"~2.5% of 1000 books expected, got {len(val)}"
    assert split == split_books(list(reversed(ids)), 0.025, 8), "split must not depend on order"
    small = split_books(ids[:100], 0.025, 8)
    assert sum(s == "val" for s in small.values()) == 8, "min_val_books must be honoured"
    assert {b for b, s in small.items() if s == "val"} <= val | set(ids[:100])
    with pytest.raises(ValueError, match="need more than 8 books"):
        split_books(ids[:8], 0.025, 8)


def test_piecewise_encoding_equals_whole_text_encoding() -> None:
    rng = random.Random(1)
    text = fake_book(rng, 40) + "\n\n   spaced  \n\n\tend  \n" + fake_book(rng, 20)
    tok = Tokenizer.train([text], vocab_size=600)
    pieces = split_pieces(text, 300)
    assert len(pieces) > 10 and "".join(pieces) == text
    whole = [tok.bos_id, *tok.encode(text), tok.eos_id]
    assert encode_document(tok, text, piece_chars=300).tolist() == whole


# ---- shards -------------------------------------------------------------------------------------------
def test_shards_hold_each_book_exactly_and_split_by_book(tmp_path: Path) -> None:
    tok = Tokenizer.byte_level()
    data, bodies = make_data_dir(tmp_path, tok, synth_share=0.2)
    index = load_index(data)
    assert index["tokenizer_sha256"] == tok.sha256()
    streams = {s: TokenStream(data, s) for s in ("train", "val")}
    for s, st in streams.items():
        shards = index["splits"][s]["shards"]
        assert len(st) == index["splits"][s]["tokens"] == sum(x["tokens"] for x in shards)
        assert all(x["tokens"] == 4096 for x in shards[:-1]), "all shards but the last are full"
    assert len(index["splits"]["train"]["shards"]) > 1
    val_bodies = [bodies[b["id"]] for b in index["books"] if b["split"] == "val"]
    assert len(val_bodies) >= 2
    for b in index["books"]:
        ids = streams[b["split"]].slice(b["start"], b["end"]).tolist()
        body = bodies[b["id"]]
        n_body = len(body.encode()) + 2
        assert ids[0] == tok.bos_id and ids[n_body - 1] == tok.eos_id
        assert tok.decode(ids[:n_body]) == body
        if b["split"] == "val":
            assert b["synth_tokens"] == 0 and len(ids) == n_body, "no synthetic docs from validation books"
    train_text = tok.decode(streams["train"].slice(0, len(streams["train"])).tolist())
    for vb in val_bodies:
        for para in vb.split("\n\n")[:5]:
            assert para not in train_text, "a validation paragraph leaked into the training stream"
    synth = index["splits"]["train"]["synth_tokens"]
    assert 0.12 < synth / index["splits"]["train"]["tokens"] < 0.28, "synthetic share near 20%"


def test_pack_respects_budget_and_keeps_whole_books(tmp_path: Path) -> None:
    data, bodies = make_data_dir(tmp_path, synth_share=0.0)
    budget_mib = 40_000 * 2 / 2**20
    packed = pack_shards(data, tmp_path / "packed", max_mib=budget_mib, max_val_tokens=15_000)
    files = list((tmp_path / "packed").glob("*.npy"))
    assert sum(np.load(f).nbytes for f in files) <= budget_mib * 2**20
    assert 0 < packed["splits"]["val"]["tokens"] <= 15_000
    assert packed["splits"]["train"]["books"] >= 2
    tok = Tokenizer.from_pretrained(tmp_path / "packed")
    for b in packed["books"]:
        ids = TokenStream(tmp_path / "packed", b["split"]).slice(b["start"], b["end"]).tolist()
        assert tok.decode(ids) == bodies[b["id"]]


# ---- loader ------------------------------------------------------------------------------------------
def test_loader_windows_cover_stream_once_per_epoch_and_resume(tmp_path: Path) -> None:
    data, _ = make_data_dir(tmp_path, synth_share=0.0)
    flat = TokenStream(data, "train").slice(0, len(TokenStream(data, "train"))).astype(np.int64)
    L, B = 64, 3
    loader = SequenceLoader(data, "train", L, B, seed=7)
    n = loader.n_windows
    assert n == (len(flat) - 1) // L
    seen = []
    for _ in range(-(-n // B)):
        batch = loader.next_batch()
        assert batch.shape == (B, L + 1)
        for row in batch.numpy():
            starts = [i for i in range(n) if np.array_equal(flat[i * L : i * L + L + 1], row)]
            assert starts, "each row must be a contiguous slice of the flat stream"
            seen.append(starts[0])
    assert sorted(seen[:n]) == list(range(n)), "epoch 0 visits every window exactly once"
    ref = SequenceLoader(data, "train", L, B, seed=7)
    ref.next_batch(), ref.next_batch()
    resumed = SequenceLoader(data, "train", L, B, seed=7)
    resumed.load_state_dict(ref.state_dict())
    for _ in range(n):  # crosses the epoch boundary
        assert ref.next_batch().equal(resumed.next_batch())
    other = SequenceLoader(data, "train", L, B, seed=8)
    assert not other.next_batch().equal(SequenceLoader(data, "train", L, B, seed=7).next_batch())
    with pytest.raises(ValueError, match="does not match"):
        SequenceLoader(data, "train", L + 1, B).load_state_dict(ref.state_dict())


# ---- synthetic documents -------------------------------------------------------------------------
def test_synth_documents_come_from_the_book_and_answer_correctly() -> None:
    rng = random.Random(3)
    book = fake_book(rng, 600)
    docs = synth_documents(book, "A/B.txt", SynthConfig(share=0.1, seed=0))
    assert docs == synth_documents(book, "A/B.txt", SynthConfig(share=0.1, seed=0)), "deterministic"
    assert 0.07 < sum(map(len, docs)) / (len(book) + sum(map(len, docs))) < 0.14
    kinds = set()
    for d in docs:
        assert "magic" not in d.lower() and "needle" not in d.lower()
        context, qa = d.rsplit("\n\nQuestion: ", 1)
        question, answer = qa.split("\nAnswer: ", 1)
        if question.startswith("Repeat this line exactly: "):
            kinds.add("copy")
            assert answer == question.removeprefix("Repeat this line exactly: ")
        elif question.startswith("In the text above"):
            kinds.add("continue")
            quote = question.split('"')[1]
            assert f"{quote} {answer}" in context.replace("\n", " ")
        else:
            kinds.add("number")
            assert answer.isdigit() and 5 <= len(answer) <= 9 and answer in context
            assert context.count(answer) == 1
    assert kinds == {"copy", "continue", "number"}
