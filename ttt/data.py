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

``build_qa_stream`` (issue 8) writes a small stream for QA fine-tuning in the same format: ``seq_len``-token rows
of whole synthetic documents (mostly ``ttt.synth`` kind ``kv``) and book text, the same split by book, plus
``qa_eval.jsonl`` (held-out kv questions from the validation books); ``compress_shards`` /
``decompress_shards`` xz the shards for carrying (measured ~0.7 bytes per token).

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
        if not 0.0 <= self.synth_share < 1.0:
            raise ValueError(f"synth_share must be in [0, 1), got {self.synth_share}")
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


def _prepare(
    tar_path: str | Path, out_dir: str | Path, tok: Tokenizer, val_frac: float, min_val_books: int
) -> tuple[Path, dict[str, str]]:
    """Create ``out_dir``, check the tokenizer fits uint16 shards, split the books (shared by both builders)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tok.vocab_size > 65535:
        raise ValueError(f"uint16 shards need vocab_size <= 65535, got {tok.vocab_size}")
    return out, split_books(list_book_ids(tar_path), val_frac, min_val_books)


def build_shards(
    tar_path: str | Path, out_dir: str | Path, tok: Tokenizer, cfg: DataConfig | None = None
) -> dict[str, Any]:
    """Tokenize the corpus into ``out_dir`` (shards + index.json + tokenizer.json); return the index."""
    from ttt.synth import SynthConfig, synth_documents

    cfg = cfg or DataConfig()
    out, split = _prepare(tar_path, out_dir, tok, cfg.val_frac, cfg.min_val_books)
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


# ---- the QA fine-tune stream (issue 8) ------------------------------------------------------------
QA_EVAL_FILE = "qa_eval.jsonl"


@dataclass(kw_only=True)
class QADataConfig:
    """``build_qa_stream``: a small packed stream for QA fine-tuning plus a held-out kv question set.

    Training rows are ``seq_len`` tokens of whole synthetic documents (``<|bos|> doc <|eos|>``, never cut by a
    row boundary, so a question is always read with its passage) and ordinary book text (contiguous slices
    of the same training book) filling the rest; synthetic documents are ``synth_share`` of all tokens.
    """

    train_tokens: int = 22_000_000  # ~18 MiB as xz-compressed uint16 (measured 0.84 bytes/token)
    val_tokens: int = 600_000  # plain text of the held-out books (LM loss before vs after)
    seq_len: int = 2048  # row length = the fine-tune's sequence length
    synth_share: float = 0.5
    kinds: tuple[str, ...] = ("kv", "copy", "continue", "number")
    weights: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    eval_questions: int = 200  # held-out kv questions from the validation books (half reader layout)
    kv_max_tokens: int = 1800  # longest plain-layout kv training passage (rows of seq_len drop longer docs)
    kv_sources_share: float = 0.4  # training kv docs in the hybrid reader's numbered-sources layout
    kv_sentence_share: float = 0.6  # training kv answers that restate the key before the value
    kv_attributes: str = "base"  # training kv docs: "wide" adds multi-word attribute names (ttt.synth)
    train_seed: int = 0  # varies the training rows only (0 = the original stream); eval questions keep seed
    reader_prompt_tokens: int = 384  # reader-layout questions fit the hybrid budget (window 512 - 128 new)
    val_frac: float = 0.025  # the split of ``DataConfig`` (same defaults = the same held-out books)
    min_val_books: int = 8
    seed: int = 0
    max_books: int | None = None
    piece_chars: int = 1 << 16

    def __post_init__(self) -> None:
        if not 0.0 <= self.synth_share < 1.0:
            raise ValueError(f"synth_share must be in [0, 1), got {self.synth_share}")
        if self.seq_len < 64 or self.train_tokens < self.seq_len:
            raise ValueError(
                f"need seq_len >= 64 and train_tokens >= seq_len, got {self.seq_len}, {self.train_tokens}"
            )
        self.kinds, self.weights = tuple(self.kinds), tuple(self.weights)

    def synth_config(self, seed_offset: int = 0) -> Any:
        from ttt.synth import SynthConfig

        return SynthConfig(
            share=0.5,
            seed=self.seed + seed_offset,
            kinds=self.kinds,
            weights=self.weights,
            kv_max_tokens=self.kv_max_tokens,
            kv_sources_share=self.kv_sources_share,
            kv_sentence_share=self.kv_sentence_share,
            kv_attributes=self.kv_attributes,
        )


class _BookText:
    """Contiguous token slices of one book, read from a random start and wrapping around."""

    def __init__(self, tok: Tokenizer, text: str, rng: Any, piece_chars: int, chars_per_token: float) -> None:
        self.tok, self.text, self.piece_chars, self.cpt = tok, text, piece_chars, chars_per_token
        self.pos = rng.randrange(max(1, len(text)))
        self.buf = np.zeros(0, dtype=np.uint16)

    def take(self, n: int) -> np.ndarray:
        while len(self.buf) < n:
            want = int(max(n - len(self.buf), 4096) * self.cpt * 1.2)
            piece = self.text[self.pos : self.pos + want]
            self.pos = self.pos + want if self.pos + want < len(self.text) else 0
            ids = [i for p in self.tok.encode_batch(split_pieces(piece, self.piece_chars)) for i in p]
            self.buf = np.concatenate([self.buf, np.asarray(ids, dtype=np.uint16)])
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _synth_batch(
    tok: Tokenizer, paragraphs: list[str], vocab: list[str], rng: Any, scfg: Any, max_len: int
) -> list[np.ndarray]:
    """64 fresh synthetic documents encoded together as ``<|bos|> doc <|eos|>`` (reversed: pop() = first)."""
    from ttt.synth import is_clean, make_document

    batch = []
    for _ in range(64):
        d = make_document(rng.choices(scfg.kinds, scfg.weights)[0], paragraphs, vocab, rng, scfg)
        if d is not None and is_clean(d):
            batch.append(d)
    return [
        np.asarray([tok.bos_id, *ids, tok.eos_id], dtype=np.uint16)
        for ids in tok.encode_batch(batch)[::-1]
        if len(ids) + 2 <= max_len  # a document longer than a row is dropped
    ]


def _qa_rows(book: Book, tok: Tokenizer, n_rows: int, cfg: QADataConfig, counts: list[int]) -> np.ndarray:
    """``n_rows`` rows of ``seq_len`` tokens from one training book; ``counts`` = [synth, total] (updated)."""
    import random

    from ttt.synth import book_vocabulary

    rng = random.Random(f"{cfg.seed}:qa:{book.id}" + (f":{cfg.train_seed}" if cfg.train_seed else ""))
    scfg = cfg.synth_config()
    paragraphs = [p for p in book.text.split("\n\n") if p.strip()]
    vocab = book_vocabulary(book.text)
    texts = _BookText(tok, book.text, rng, cfg.piece_chars, scfg.chars_per_token)
    docs: list[np.ndarray] = []
    rows = np.zeros((n_rows, cfg.seq_len), dtype=np.uint16)
    for r in range(n_rows):
        at = 0
        while at < cfg.seq_len:
            left = cfg.seq_len - at
            if counts[0] < cfg.synth_share * (counts[1] + 1) and paragraphs:
                if not docs:
                    docs = _synth_batch(tok, paragraphs, vocab, rng, scfg, cfg.seq_len)
                fit = next((i for i in range(len(docs) - 1, -1, -1) if len(docs[i]) <= left), None)
                if fit is not None:
                    piece = docs.pop(fit)
                    rows[r, at : at + len(piece)] = piece
                    at, counts[0], counts[1] = at + len(piece), counts[0] + len(piece), counts[1] + len(piece)
                    continue
            n = left if left < 64 else min(left, rng.randint(64, cfg.seq_len))
            rows[r, at : at + n] = texts.take(n)
            at, counts[1] = at + n, counts[1] + n
    return rows


def _qa_eval_items(book: Book, tok: Tokenizer, n: int, cfg: QADataConfig) -> list[dict[str, Any]]:
    """``n`` held-out kv questions from one validation book: half in the reader layout (short), half long."""
    import random

    from ttt.synth import SynthConfig, book_vocabulary, is_clean, kv_example

    rng = random.Random(f"{cfg.seed}:qa-eval:{book.id}")
    # SynthConfig's own kv defaults, not the training rows' knobs: the question set never depends on them
    scfg = SynthConfig(share=0.5, seed=cfg.seed, kinds=cfg.kinds, weights=cfg.weights)
    paragraphs = [p for p in book.text.split("\n\n") if p.strip()]
    vocab = book_vocabulary(book.text)
    items: list[dict[str, Any]] = []
    for _ in range(20 * n):
        if len(items) == n:
            break
        fmt = "sources" if len(items) % 2 == 0 else "plain"
        lo, hi = (100, scfg.kv_sources_max_tokens) if fmt == "sources" else (600, scfg.kv_max_tokens)
        ex = kv_example(paragraphs, vocab, rng, scfg, fmt=fmt, min_tokens=lo, max_tokens=hi)
        if ex is None or not is_clean(ex.text):
            continue
        n_prompt = len(tok.encode(ex.prompt)) + 1  # + <|bos|>
        if fmt == "sources" and n_prompt > cfg.reader_prompt_tokens:
            continue
        # tokens from the start of the earliest queried fact to the end of the prompt
        dist = n_prompt - 1 - min(len(tok.encode(ex.prompt[:o])) for o in ex.fact_offsets)
        items.append(
            {
                "book": book.id,
                "prompt": ex.prompt,
                "answer": ex.answer,
                "values": ex.values,
                "question_kind": ex.question_kind,
                "value_kind": ex.value_kind,
                "fmt": ex.fmt,
                "facts": ex.facts,
                "n_facts": ex.n_facts,
                "prompt_tokens": n_prompt,
                "answer_tokens": len(tok.encode(" " + ex.answer)),
                "fact_distance": dist,
            }
        )
    return items


def build_qa_stream(
    tar_path: str | Path, out_dir: str | Path, tok: Tokenizer, cfg: QADataConfig | None = None
) -> dict[str, Any]:
    """Write the QA fine-tune stream to ``out_dir`` (shards + index.json + tokenizer.json + qa_eval.jsonl).

    Books are split train/val exactly as ``build_shards`` does (``split_books``); synthetic documents and
    training rows come only from training books, the val split and the kv question set only from the
    held-out books. Every training book gives about ``train_tokens / n_train_books`` tokens.
    """
    cfg = cfg or QADataConfig()
    out, split = _prepare(tar_path, out_dir, tok, cfg.val_frac, cfg.min_val_books)
    n_train = sum(v == "train" for v in split.values())
    n_val = len(split) - n_train
    if cfg.max_books is not None:
        n_train = min(n_train, cfg.max_books)
    writers = {s: _ShardWriter(out, s, 1 << 30) for s in SPLITS}
    counts, rows_left, books, evals = [0, 0], cfg.train_tokens // cfg.seq_len, [], []
    per_val = -(-cfg.eval_questions // n_val)
    for book in iter_books(tar_path, cfg.max_books):
        s = split.get(book.id)
        assert s is not None, f"book {book.id!r} is not in the manifest; rebuild MANIFEST.tsv"
        if s == "val":
            ids = encode_document(tok, book.text, cfg.piece_chars)[
                : max(0, cfg.val_tokens - writers["val"].total)
            ]
            start, end = writers["val"].add(ids) if len(ids) else (writers["val"].total,) * 2
            evals += _qa_eval_items(book, tok, per_val, cfg)
            books.append({"id": book.id, "split": s, "start": start, "end": end, "synth_tokens": 0})
            continue
        n_rows = round(rows_left / max(1, n_train))
        n_train -= 1
        if n_rows == 0:
            continue
        synth0 = counts[0]
        start, end = writers["train"].add(_qa_rows(book, tok, n_rows, cfg, counts).reshape(-1))
        rows_left -= n_rows
        books.append(
            {"id": book.id, "split": s, "start": start, "end": end, "synth_tokens": counts[0] - synth0}
        )
        log.info("%s: %d rows (%d synthetic tokens so far of %d)", book.id, n_rows, counts[0], counts[1])
    return _finish_qa_stream(out, tok, cfg, writers, books, evals[: cfg.eval_questions], counts)


def _finish_qa_stream(
    out: Path,
    tok: Tokenizer,
    cfg: QADataConfig,
    writers: dict[str, _ShardWriter],
    books: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    counts: list[int],
) -> dict[str, Any]:
    """Close the shards; write qa_eval.jsonl, tokenizer.json and index.json; return the index."""
    for w in writers.values():
        w.close()
    if counts[1] and counts[0] < 0.8 * cfg.synth_share * counts[1]:
        log.warning(
            "synthetic share %.3f is below the target %.3f (rows too short for the documents?)",
            counts[0] / counts[1],
            cfg.synth_share,
        )
    dcfg = DataConfig(
        val_frac=cfg.val_frac,
        min_val_books=cfg.min_val_books,
        synth_share=cfg.synth_share,
        seed=cfg.seed,
        max_books=cfg.max_books,
    )
    index = _make_index(tok, dcfg, writers, books)
    index["qa_config"] = asdict(cfg)
    index["eval_questions"] = len(evals)
    with (out / QA_EVAL_FILE).open("w", encoding="utf-8") as f:
        for item in evals:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    tok.save(out / "tokenizer.json")
    _write_json(out / INDEX_FILE, index)
    return index


def compress_shards(data_dir: str | Path, preset: int = 6) -> int:
    """xz every shard in place (``x.npy`` -> ``x.npy.xz``) for carrying; returns the bytes of the dir."""
    import lzma

    d = Path(data_dir)
    for s in SPLITS:
        for sh in load_index(d)["splits"][s]["shards"]:
            src = d / sh["file"]
            tmp = d / (sh["file"] + ".xz.tmp")
            tmp.write_bytes(lzma.compress(src.read_bytes(), preset=preset))
            os.replace(tmp, d / (sh["file"] + ".xz"))
            src.unlink()
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def decompress_shards(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Copy a (possibly xz-compressed) shard dir to ``dst_dir`` with plain ``.npy`` shards; returns dst_dir."""
    import lzma

    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.endswith(".npy.xz"):
            tmp = dst / (f.name[:-3] + ".tmp")
            tmp.write_bytes(lzma.decompress(f.read_bytes()))
            os.replace(tmp, dst / f.name[:-3])
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst
