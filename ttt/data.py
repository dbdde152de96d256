"""Corpus -> token shards -> training sequences.

Pipeline (``ttt-rag train data``):
  1. Stream the books out of the corpus tarball (no unpacking to disk), decode, CRLF -> LF, and strip the
     Project Gutenberg header/footer (modern ``*** START/END OF ...`` markers and the older
     ``*END*THE SMALL PRINT!`` / ``End of Project Gutenberg`` styles).
  2. Split train/validation BY BOOK: the books with the lowest sha256(book id) are validation, at least
     ``min_val_books`` and about ``val_frac`` of all books. The split depends only on the ids.
  3. Tokenize each book as ``<|bos|> body <|eos|>``; long books are encoded in pieces cut only where the
     ByteLevel pre-tokenizer would cut anyway (before a whitespace run that follows a non-space), so the ids
     equal whole-text encoding; pieces are encoded in parallel (Rust threads).
     Training books may be followed by synthetic reading documents made from that same book (``ttt.synth``).
  4. Write uint16 ``{split}_{k:05d}.npy`` shards + ``index.json`` (tokens per shard, per-book spans in the
     split's flat stream, tokenizer hash) + a copy of ``tokenizer.json``.

``pack_shards`` copies a random-by-hash subset of whole training books (plus validation) into a small dir
for carrying to the GPU machine. ``SequenceLoader`` yields contiguous ``seq_len + 1`` slices of a split's
flat stream (inputs ``[:-1]``, targets ``[1:]``), shuffled per epoch with a seed, resumable by position.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ttt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SPLITS = ("train", "val")

_START_RE = re.compile(
    r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*$|\*END\*THE SMALL PRINT![^\n]*$", re.M | re.I
)
_END_RE = re.compile(
    r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG|^\**\s*End of (?:the )?Project Gutenberg", re.M | re.I
)


@dataclass(kw_only=True)
class DataConfig:
    """How ``build_shards`` turns the corpus into shards."""

    val_frac: float = 0.025  # share of books held out (by hash of the book id)
    min_val_books: int = 8
    shard_tokens: int = 1 << 24  # 16M tokens = 32 MiB per uint16 shard
    synth_share: float = 0.10  # share of TRAINING tokens that are synthetic reading docs (0 = off)
    seed: int = 0  # synthetic-document sampling
    max_books: int | None = None  # stop after this many books (quick runs); None = all
    piece_chars: int = 1 << 16  # target size of the pieces one book is encoded in

    def __post_init__(self) -> None:
        if not 0.0 < self.val_frac < 0.5:
            raise ValueError(f"val_frac must be in (0, 0.5), got {self.val_frac}")
        if not 0.0 <= self.synth_share < 0.5:
            raise ValueError(f"synth_share must be in [0, 0.5), got {self.synth_share}")
        if self.shard_tokens < 1024:
            raise ValueError(f"shard_tokens must be >= 1024, got {self.shard_tokens}")


@dataclass
class Book:
    id: str  # path inside the corpus folder, e.g. "Alcott, Louisa May/Little Women.txt"
    text: str  # body with PG header/footer removed, LF line endings


# ---- reading the corpus ---------------------------------------------------------------------------
def strip_gutenberg(text: str) -> str:
    """Remove the Project Gutenberg header and footer; text without markers is returned whole."""
    start = _START_RE.search(text)
    begin = start.end() if start else 0
    end = _END_RE.search(text, begin)
    return text[begin : end.start() if end else len(text)].strip("\n ")


def _decode(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _book_id(member_name: str) -> str:
    # "gutenberg-top100-authors/Author/Title.txt" -> "Author/Title.txt"
    parts = member_name.split("/", 1)
    return parts[1] if len(parts) == 2 else parts[0]


def list_book_ids(tar_path: str | Path) -> list[str]:
    """Book ids from MANIFEST.tsv next to the tarball, or by listing the tarball."""
    manifest = Path(tar_path).parent / "MANIFEST.tsv"
    if manifest.is_file():
        rows = manifest.read_text(encoding="utf-8").splitlines()[1:]
        return sorted(r.split("\t", 1)[0] for r in rows if r.strip())
    with tarfile.open(tar_path, "r|*") as tf:
        return sorted(_book_id(m.name) for m in tf if m.isfile() and m.name.endswith(".txt"))


def iter_books(tar_path: str | Path, max_books: int | None = None) -> Iterator[Book]:
    """Stream books out of a (compressed) tarball in archive order."""
    n = 0
    with tarfile.open(tar_path, "r|*") as tf:
        for m in tf:
            if not (m.isfile() and m.name.endswith(".txt")):
                continue
            f = tf.extractfile(m)
            assert f is not None, f"cannot read {m.name}"
            yield Book(id=_book_id(m.name), text=strip_gutenberg(_decode(f.read())))
            n += 1
            if max_books is not None and n >= max_books:
                return


def _hash01(book_id: str) -> float:
    return int(hashlib.sha256(book_id.encode()).hexdigest()[:15], 16) / 16**15


def split_books(book_ids: list[str], val_frac: float = 0.025, min_val_books: int = 8) -> dict[str, str]:
    """book id -> "train" | "val": the ``max(min_val_books, #hash < val_frac)`` lowest-hash books are val."""
    if len(book_ids) <= min_val_books:
        raise ValueError(
            f"need more than {min_val_books} books to hold {min_val_books} out, got {len(book_ids)}"
        )
    ranked = sorted(set(book_ids), key=_hash01)
    n_val = max(min_val_books, sum(_hash01(b) < val_frac for b in ranked))
    val = set(ranked[:n_val])
    return {b: ("val" if b in val else "train") for b in book_ids}


# ---- tokenizing -----------------------------------------------------------------------------------
def split_pieces(text: str, piece_chars: int) -> list[str]:
    """Cut text into ~piece_chars pieces, only just before a whitespace run that follows a non-space.

    The ByteLevel regex never joins a non-space character with the whitespace after it, and how a
    whitespace run is split depends only on what follows it, so encoding the pieces separately gives the
    same ids as encoding the whole text.
    """
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = text.find("\n", start + piece_chars)
        while cut != -1 and (text[cut - 1].isspace()):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_document(tok: Tokenizer, text: str, piece_chars: int = 1 << 16) -> np.ndarray:
    """``<|bos|> text <|eos|>`` as uint16 ids (pieces encoded in parallel)."""
    ids = [tok.bos_id]
    for piece in tok.encode_batch(split_pieces(text, piece_chars)):
        ids.extend(piece)
    ids.append(tok.eos_id)
    return np.asarray(ids, dtype=np.uint16)


class _ShardWriter:
    """Appends documents to one split's flat stream, cutting it into fixed-size .npy shards."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buf_len = 0
        self.total = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, ids: np.ndarray) -> tuple[int, int]:
        """Append ids; return their [start, end) span in the split's flat stream."""
        start = self.total
        self.buf.append(ids)
        self.buf_len += len(ids)
        self.total += len(ids)
        while self.buf_len >= self.shard_tokens:
            flat = np.concatenate(self.buf)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self.buf, self.buf_len = ([rest] if len(rest) else []), len(rest)
        return start, self.total

    def _write(self, arr: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):05d}.npy"
        np.save(self.out_dir / name, arr.astype(np.uint16, copy=False))
        self.shards.append({"file": name, "tokens": int(len(arr))})

    def close(self) -> None:
        if self.buf_len:
            self._write(np.concatenate(self.buf))
            self.buf, self.buf_len = [], 0


def build_shards(
    tar_path: str | Path, out_dir: str | Path, tok: Tokenizer, cfg: DataConfig | None = None
) -> dict[str, Any]:
    """Tokenize the corpus into ``out_dir`` (shards + index.json + tokenizer.json); return the index."""
    from ttt.synth import SynthConfig, synth_documents

    cfg = cfg or DataConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tok.vocab_size > 65535:
        raise ValueError(f"uint16 shards need vocab_size <= 65535, got {tok.vocab_size}")
    split = split_books(list_book_ids(tar_path), cfg.val_frac, cfg.min_val_books)
    writers = {s: _ShardWriter(out, s, cfg.shard_tokens) for s in SPLITS}
    books: list[dict[str, Any]] = []
    synth_cfg = SynthConfig(share=cfg.synth_share, seed=cfg.seed)
    for book in iter_books(tar_path, cfg.max_books):
        s = split.get(book.id)
        assert s is not None, f"book {book.id!r} is not in the manifest; rebuild MANIFEST.tsv"
        ids = encode_document(tok, book.text, cfg.piece_chars)
        start, end = writers[s].add(ids)
        n_synth = 0
        if s == "train" and cfg.synth_share > 0:  # synthetic docs only ever come from training books
            for doc in synth_documents(book.text, book.id, synth_cfg):
                d_start, end = writers[s].add(encode_document(tok, doc, cfg.piece_chars))
                n_synth += end - d_start
        books.append({"id": book.id, "split": s, "start": start, "end": end, "synth_tokens": n_synth})
        log.info("%s %-5s %8d tokens (+%d synthetic)", book.id, s, len(ids), n_synth)
    for w in writers.values():
        w.close()
    index = _make_index(tok, cfg, writers, books)
    tok.save(out / "tokenizer.json")
    _write_json(out / INDEX_FILE, index)
    return index


def _make_index(
    tok: Tokenizer, cfg: DataConfig, writers: dict[str, _ShardWriter], books: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "format": "ttt-rag-shards-v1",
        "dtype": "uint16",
        "tokenizer_sha256": tok.sha256(),
        "vocab_size": tok.vocab_size,
        "config": asdict(cfg),
        "splits": {
            s: {
                "tokens": w.total,
                "shards": w.shards,
                "books": sum(b["split"] == s for b in books),
                "synth_tokens": sum(b["synth_tokens"] for b in books if b["split"] == s),
            }
            for s, w in writers.items()
        },
        "books": books,
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_index(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {INDEX_FILE} in {data_dir}; build it with `ttt-rag train data`")
    return json.loads(path.read_text())


# ---- packing for the GPU machine ------------------------------------------------------------------
def pack_shards(
    data_dir: str | Path, out_dir: str | Path, max_mib: float = 30.0, max_val_tokens: int = 2_000_000
) -> dict[str, Any]:
    """Copy whole training books (in hash order, with their synthetic docs) + validation into <= max_mib."""
    src, out = Path(data_dir), Path(out_dir)
    index = load_index(src)
    budget = int(max_mib * 2**20) // 2  # uint16 tokens
    streams = {s: TokenStream(src, s) for s in SPLITS}
    out.mkdir(parents=True, exist_ok=True)
    val_books = [b for b in index["books"] if b["split"] == "val"]
    train_books = sorted((b for b in index["books"] if b["split"] == "train"), key=lambda b: _hash01(b["id"]))
    chosen: dict[str, list[dict[str, Any]]] = {"val": [], "train": []}
    used = 0
    for s, cands, cap in (("val", val_books, max_val_tokens), ("train", train_books, None)):
        n_split = 0
        for b in cands:
            n = b["end"] - b["start"]
            if used + n > budget or (cap is not None and n_split + n > cap):
                continue
            chosen[s].append(b)
            used, n_split = used + n, n_split + n
    writers = {s: _ShardWriter(out, s, 1 << 30) for s in SPLITS}
    books = []
    for s in SPLITS:
        for b in chosen[s]:
            start, end = writers[s].add(streams[s].slice(b["start"], b["end"]))
            books.append({**b, "start": start, "end": end})
        writers[s].close()
    packed = _make_index(Tokenizer.from_pretrained(src), DataConfig(**index["config"]), writers, books)
    packed["packed_from"] = {"tokens": {s: index["splits"][s]["tokens"] for s in SPLITS}, "max_mib": max_mib}
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    _write_json(out / INDEX_FILE, packed)
    log.info("packed %d train + %d val tokens into %s", writers["train"].total, writers["val"].total, out)
    return packed


# ---- reading shards -------------------------------------------------------------------------------
class TokenStream:
    """One split's shards viewed as a single flat uint16 array (memory-mapped)."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        index = load_index(data_dir)
        self.index = index
        self.arrays = [
            np.load(Path(data_dir) / s["file"], mmap_mode="r") for s in index["splits"][split]["shards"]
        ]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the flat stream, across shard boundaries."""
        assert 0 <= start <= stop <= len(self), f"slice [{start}, {stop}) outside stream of {len(self)}"
        parts = []
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            lo = start - self.offsets[k]
            hi = min(stop, self.offsets[k + 1]) - self.offsets[k]
            parts.append(self.arrays[k][lo:hi])
            start = int(self.offsets[k] + hi)
            k += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


class SequenceLoader:
    """Batches (B, seq_len + 1) of contiguous slices of the flat stream, window i = [i*L, i*L + L + 1).

    Windows are visited in a fresh seeded permutation each epoch (or in order with ``shuffle=False``);
    ``position`` counts sequences served so far, so ``state_dict``/``load_state_dict`` resume exactly.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        position: int = 0,
    ) -> None:
        self.stream = TokenStream(data_dir, split)
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.n_windows = (len(self.stream) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"split {split!r} has {len(self.stream)} tokens, too few for seq_len {seq_len}")
        self.position = position
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _window(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n_windows)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def next_batch(self) -> Any:
        import torch

        rows = []
        for _ in range(self.batch_size):
            start = self._window(self.position) * self.seq_len
            rows.append(self.stream.slice(start, start + self.seq_len + 1).astype(np.int64))
            self.position += 1
        return torch.from_numpy(np.stack(rows))  # (B, L + 1)

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> float:
        return self.position / self.n_windows

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seq_len"] != self.seq_len or state["seed"] != self.seed:
            raise ValueError(f"loader state {state} does not match seq_len={self.seq_len} seed={self.seed}")
        self.position = int(state["position"])


def train_tokenizer(tar_path: str | Path, vocab_size: int = 8192, cfg: DataConfig | None = None) -> Tokenizer:
    """Train the BPE tokenizer on the TRAINING books only (validation books never seen)."""
    cfg = cfg or DataConfig()
    split = split_books(list_book_ids(tar_path), cfg.val_frac, cfg.min_val_books)
    texts = (
        piece
        for b in iter_books(tar_path, cfg.max_books)
        if split.get(b.id) == "train"
        for piece in split_pieces(b.text, cfg.piece_chars)
    )
    return Tokenizer.train(texts, vocab_size=vocab_size)
