"""HybridRAG: one object that ingests a corpus, remembers it two ways and answers by the right path.

- ``ingest``: documents -> retrieval index (chunks, BM25 + dense) and -> the TTT model reads them
  (documents joined with the tokenizer's separator token, continuing from the saved corpus memory); the new
  ``TTTState`` is saved as the next memory version under ``store_dir/memory/``.
- ``answer``: the router (or the caller) picks the route:
  comprehension = memory copy + question -> generate;
  lookup        = top-k chunks -> reader prompt -> generate with the base weights (TTT frozen);
  fused         = memory copy + top-k chunks in the window -> generate.
- ``delete``: removes documents from the index and marks the memory stale; the next answer that needs the
  memory re-reads the remaining documents first and says so (``Answer.memory_rebuilt``).

Requests never share state: the memory is loaded once, never mutated, and cloned per request; ingest,
delete and rebuilds hold one lock.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybrid.errors import (
    EmptyQuestionError,
    InvalidDocumentsError,
    InvalidQuestionError,
    NotIngestedError,
    UnknownRouteError,
)
from hybrid.extractive import value_question
from hybrid.memory import CorpusMemory, MemoryMeta, text_sha1
from hybrid.reader import (
    ReaderConfig,
    Source,
    build_prompt,
    cite,
    content_words,
    hit_source,
    token_budget,
)

log = logging.getLogger(__name__)

ROUTES = ("comprehension", "lookup", "fused")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "ttt-e2e-ref"


@dataclass(kw_only=True)
class HybridConfig:
    top_k: int = 4  # chunks retrieved for lookup / fused
    max_new_tokens: int = 64
    temperature: float = 0.0
    search_mode: str = "hybrid"  # passed to Index.search ("bm25" for a BM25-only index)
    read_block_tokens: int = 8192  # corpus tokens per prefill call while ingesting (progress granularity)
    reader: ReaderConfig = field(default_factory=ReaderConfig)

    def __post_init__(self) -> None:
        assert self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"
        assert self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"
        assert self.read_block_tokens >= 1, f"read_block_tokens must be >= 1, got {self.read_block_tokens}"


@dataclass
class IngestReport:
    doc_ids: list[str]
    chunks: int  # chunks the index holds for these documents
    tokens_read: int  # corpus tokens the TTT model read in this call (separators included)
    version: int  # corpus-memory version after this call (0 = no memory yet)
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    chunk_ids: list[str] = field(default_factory=list)
    memory_rebuilt: bool = False  # the whole corpus was re-read (memory was stale or documents changed)


@dataclass
class Answer:
    text: str
    route: str
    decision: Any  # router.RouteDecision (route, confidence, reason)
    sources: list[Source]
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    usage: dict[str, int] = field(default_factory=dict)  # prompt/completion/total tokens
    memory_rebuilt: bool = False  # a stale memory was rebuilt for this answer
    memory_version: int | None = None  # corpus-memory version used (None for lookup)

    def to_dict(self) -> dict[str, Any]:
        d = self.decision
        return {
            "answer": self.text,
            "route": self.route,
            "decision": {"route": d.route, "confidence": d.confidence, "reason": d.reason},
            "sources": [s.to_dict() for s in self.sources],
            "timings": dict(self.timings),
            "usage": dict(self.usage),
            "memory_rebuilt": self.memory_rebuilt,
            "memory_version": self.memory_version,
        }


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    """A view of ``model`` sharing its weights whose inner SGD step has lr 0 (TTT off: base weights)."""
    view = copy.copy(model)  # shallow: parameters and submodules are shared, not copied
    view.cfg = dataclasses.replace(model.cfg, ttt_lr=0.0)
    return view


def model_fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of a model: its config plus a sample of every parameter."""
    h = hashlib.sha1(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def normalize_documents(docs: Any) -> list[tuple[str, str]]:
    """str | (doc_id, text) | LangChain Document (or a list of them) -> [(doc_id, text)]; ids unique."""
    if isinstance(docs, str | tuple) or hasattr(docs, "page_content"):
        docs = [docs]
    if not isinstance(docs, Iterable):
        raise InvalidDocumentsError(
            f"ingest takes a list of texts or (doc_id, text) pairs, got {type(docs).__name__}"
        )
    out: list[tuple[str, str]] = []
    for i, d in enumerate(docs):
        if isinstance(d, str):
            doc_id, text = f"doc-{text_sha1(d)[:12]}", d
        elif isinstance(d, tuple) and len(d) == 2:
            doc_id, text = d
        elif hasattr(d, "page_content"):
            text = d.page_content
            doc_id = getattr(d, "id", None) or (d.metadata or {}).get("id") or f"doc-{text_sha1(text)[:12]}"
        else:
            raise InvalidDocumentsError(
                f"document {i} must be a str, (doc_id, text) or Document, got {type(d).__name__}"
            )
        if not isinstance(doc_id, str) or not doc_id.strip():
            raise InvalidDocumentsError(f"document {i}: id must be a non-empty string, got {doc_id!r}")
        if not isinstance(text, str) or not text.strip():
            raise InvalidDocumentsError(f"document {doc_id!r} is empty or not a string")
        out.append((doc_id, text))
    if not out:
        raise InvalidDocumentsError("ingest got no documents")
    ids = [d for d, _ in out]
    dup = sorted({d for d in ids if ids.count(d) > 1})
    if dup:
        raise InvalidDocumentsError(f"duplicate document ids in one ingest call: {dup[:5]}")
    return out


class HybridRAG:
    """See the module docstring. Build with ``from_pretrained``; pass an ``Index`` + model to test."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        index: Any,
        *,
        router: Any = None,
        config: HybridConfig | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.index = index
        self.config = config or HybridConfig()
        self.memory = CorpusMemory(index.store_dir)
        self._router = router
        self._lock = threading.RLock()
        self._cache: tuple[int, Any] | None = None  # (memory version, loaded TTTState), never mutated
        self._token_texts: list[str] | None = None  # each token id's text (copy-constrained answers)
        self._fingerprint = model_fingerprint(model)
        assert tokenizer.vocab_size <= model.cfg.vocab_size, (
            f"tokenizer vocab {tokenizer.vocab_size} > model vocab {model.cfg.vocab_size}"
        )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path | None,
        store_dir: str | Path,
        device: str | None = None,
        *,
        dense: bool = True,
        router: Any = None,
        config: HybridConfig | None = None,
    ) -> HybridRAG:
        """Load the model (``None`` -> the shipped one) and open or create the store's index."""
        from retrieval import Index

        model, tok = load_model(model_dir, device)
        store_dir = Path(store_dir)
        if (store_dir / "manifest.json").exists():
            index = Index.open(store_dir)
        else:
            index = Index.create(store_dir, dense=dense)
        cfg = config or HybridConfig(search_mode="hybrid" if index.dense_enabled else "bm25")
        return cls(model, tok, index, router=router, config=cfg)

    # ---- documents ----------------------------------------------------------------------------------
    def documents(self) -> list[str]:
        """Ids of the stored documents, in insertion order."""
        return list(self.index.documents())

    def ingest(self, docs: Any, *, progress: bool = False) -> IngestReport:
        """Index ``docs`` and let the model read the new ones (continuing from the saved memory)."""
        items = normalize_documents(docs)
        t0 = time.perf_counter()
        with self._lock:
            before = self.index.documents()
            chunk_ids = self.index.add(items)  # validates everything before changing anything
            for doc_id, text in items:
                self.memory.put_text(doc_id, text)
            t_index = time.perf_counter() - t0
            meta = self.memory.head()
            changed = any(
                d in before and before[d].sha256 != self.index.documents()[d].sha256 for d, _ in items
            )
            usable = meta is not None and self._memory_matches(meta, set(before))
            t1 = time.perf_counter()
            if usable and not changed:
                known = set(meta.doc_ids)
                new = [(d, t) for d, t in items if d not in known]
                meta, n_tok = self._read(new, meta, progress) if new else (meta, 0)
                rebuilt = False
            elif meta is None and not before:  # the first ingest into an empty store
                meta, n_tok = self._read(items, None, progress)
                rebuilt = False
            else:  # documents changed, or the memory is stale / missing / from another model
                meta, n_tok = self._rebuild(progress)
                rebuilt = True
        timings = {"index": t_index, "read": time.perf_counter() - t1, "total": time.perf_counter() - t0}
        return IngestReport(
            [d for d, _ in items], len(chunk_ids), n_tok, meta.version, timings, chunk_ids, rebuilt
        )

    def delete(self, doc_ids: Sequence[str]) -> int:
        """Remove documents; the corpus memory becomes stale (rebuilt by the next answer that needs it)."""
        if isinstance(doc_ids, str) or not all(isinstance(d, str) for d in doc_ids):
            raise InvalidDocumentsError("delete takes a list of document id strings")
        with self._lock:
            n = self.index.delete(list(doc_ids))
            meta = self.memory.head()
            if meta is not None and set(doc_ids) & set(meta.doc_ids):
                self.memory.mark_stale()
            for d in doc_ids:
                if d not in self.index.documents():
                    self.memory.drop_text(d)
        return n

    def search(self, question: str, k: int | None = None, mode: str | None = None) -> list[Source]:
        """Top-k chunks for ``question`` as ``Source``s (retrieval only, no generation)."""
        q = check_question(question)
        k = self.config.top_k if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InvalidQuestionError(f"k must be an integer >= 1, got {k!r}")
        hits = self.index.search(q, k=k, mode=mode or self.config.search_mode)
        return [hit_source(h, h.chunk.text, 0) for h in hits]

    # ---- corpus memory --------------------------------------------------------------------------------
    def _memory_matches(self, meta: MemoryMeta, doc_ids: set[str]) -> bool:
        return not meta.stale and meta.model == self._fingerprint and set(meta.doc_ids) == doc_ids

    def _corpus_tokens(self, items: Sequence[tuple[str, str]]) -> list[int]:
        ids: list[int] = []
        for _, text in items:  # every document followed by the separator token
            ids += self.tokenizer.encode(text) + [self.tokenizer.sep_id]
        return ids

    def _read(
        self, items: Sequence[tuple[str, str]], meta: MemoryMeta | None, progress: bool
    ) -> tuple[MemoryMeta, int]:
        """Prefill the corpus tokens of ``items`` on top of ``meta``'s state; save the next version."""
        state = self._load_state(meta) if meta is not None else None
        ids = self._corpus_tokens(items)
        state = read_tokens(self.model, ids, state, self.config.read_block_tokens, progress)
        prev_docs = meta.doc_ids if meta is not None else []
        prev_hashes = meta.doc_hashes if meta is not None else {}
        last = max((m.version for m in self.memory.history()), default=0)
        new_meta = MemoryMeta(
            version=last + 1,
            doc_ids=prev_docs + [d for d, _ in items],
            doc_hashes=prev_hashes | {d: text_sha1(t) for d, t in items},
            tokens_read=(meta.tokens_read if meta is not None else 0) + len(ids),
            model=self._fingerprint,
        )
        self.memory.save(state, new_meta)
        self._cache = (new_meta.version, state)
        return new_meta, len(ids)

    def _rebuild(self, progress: bool) -> tuple[MemoryMeta, int]:
        """Re-read every stored document from a fresh state."""
        items = [(d, self.memory.get_text(d)) for d in self.index.documents()]
        log.info("rebuilding the corpus memory from %d documents", len(items))
        return self._read(items, None, progress)

    def _load_state(self, meta: MemoryMeta) -> Any:
        if self._cache is None or self._cache[0] != meta.version:
            state, _ = self.memory.load(meta.version, device=str(self.device))
            self._cache = (meta.version, state)
        return self._cache[1]

    def memory_state(self) -> tuple[Any, MemoryMeta, bool]:
        """The current corpus memory (rebuilt first when stale), its metadata and whether it was rebuilt.

        The returned state is shared: clone it before use (``answer`` does).
        """
        with self._lock:
            docs = set(self.index.documents())
            if not docs:
                raise NotIngestedError("no documents ingested yet: call ingest() before answer()")
            meta = self.memory.head()
            if meta is not None and self._memory_matches(meta, docs):
                return self._load_state(meta), meta, False
            meta, _ = self._rebuild(progress=False)
            return self._load_state(meta), meta, True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- answering ------------------------------------------------------------------------------------
    @property
    def router(self) -> Any:
        if self._router is None:
            from router import Router

            self._router = Router.load_default()
        return self._router

    def answer(
        self,
        question: str,
        route: str = "auto",
        top_k: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        stop: Sequence[str] | None = None,
        answer_start: str = "",
    ) -> Answer:
        """Answer ``question`` by ``route`` ('auto' asks the router); see the module docstring.

        ``answer_start``: text the answer begins with (RULER's answer prefix, a format the caller wants); the
        model continues it and ``Answer.text`` is the continuation only.
        """
        final = None
        args = (question, route, top_k, max_new_tokens, temperature, stop, answer_start)
        for item in self.answer_stream(*args):
            final = item
        assert isinstance(final, Answer), "answer_stream must end with an Answer"
        return final

    def answer_stream(
        self,
        question: str,
        route: str = "auto",
        top_k: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        stop: Sequence[str] | None = None,
        answer_start: str = "",
    ) -> Iterator[str | Answer]:
        """Yield the answer text in pieces as it is generated, then the final ``Answer``."""
        plan = self._plan(question, route, top_k, max_new_tokens, answer_start)
        t_gen = time.perf_counter()
        model = _frozen(self.model) if plan["state"] is None else self.model
        prompt = torch.tensor([plan["prompt"].ids], dtype=torch.long, device=self.device)
        temp = self.config.temperature if temperature is None else temperature
        steps = model.generate_iter(
            prompt,
            plan["state"],
            max_new_tokens=plan["max_new"],
            temperature=temp,
            eos_id=self.tokenizer.eos_id,
            constraint=self._constraint(plan),
            contrast_prompt=plan["contrast"],
            contrast_alpha=self.config.reader.context_contrast,
        )
        ids: list[int] = []
        pieces: list[str] = []
        for piece in stream_text(steps, self.tokenizer, stop, ids):
            pieces.append(piece)
            yield piece
        text = "".join(pieces)
        timings = plan["timings"] | {"generate": time.perf_counter() - t_gen}
        timings["total"] = time.perf_counter() - plan["t0"]
        n_prompt = len(plan["prompt"].ids)
        said = plan["answer_start"] + text  # what the answer states, for citation
        sources = cite(said, plan["prompt"].sources, self.config.reader) if plan["prompt"].sources else []
        yield Answer(
            text=text,
            route=plan["route"],
            decision=plan["decision"],
            sources=sources,
            timings=timings,
            usage={
                "prompt_tokens": n_prompt,
                "completion_tokens": len(ids),
                "total_tokens": n_prompt + len(ids),
                "memory_tokens": plan["memory_tokens"],
            },
            memory_rebuilt=plan["rebuilt"],
            memory_version=plan["memory_version"],
        )

    def _constraint(self, plan: dict[str, Any]) -> Any:
        """Decoding rule over the prompt's numbered sources (None: free generation): ``ValueAnswer`` for a value
        question (``ReaderConfig.value_answers``, lookup and fused routes), else ``ValueCopy`` for a lookup
        (``ReaderConfig.extractive``)."""
        p, reader = plan["prompt"], self.config.reader
        if not p.sources or not (reader.extractive or reader.value_answers):
            return None
        from hybrid.extractive import (
            ValueAnswer,
            ValueCopy,
            best_value_sentence,
            digit_words,
            relevant_value_units,
            token_texts,
        )

        if self._token_texts is None:
            self._token_texts = token_texts(self.tokenizer, self.model.cfg.vocab_size)
        stop = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        kind = plan["value_kind"]
        # lookup or fused: whatever route put sources in the prompt; never a value the question states
        if kind is not None:
            q = plan["question"]
            if kind == "one":  # the sources' sentence with a value that is closest to the question
                more = [s.text for s in p.sources[1:]]
                text = best_value_sentence(q, p.sources[0].text, self._similarity, more=more) or ""
            else:  # every value of the sources' units that stand out as relevant
                text = "\n".join(
                    relevant_value_units(q, "\n".join(s.text for s in p.sources), self._similarity)
                )
            try:
                return ValueAnswer(
                    text,
                    self._token_texts,
                    stop_ids=stop,
                    single=kind == "one",
                    exhaustive=True,
                    known=digit_words(q),
                )
            except ValueError:  # no value in those sources: the configured rule below
                pass
        if not reader.extractive or plan["route"] != "lookup":
            return None
        n_top = reader.extractive_sources
        if n_top is None:
            source = self.tokenizer.decode(p.ids[p.body[0] : p.body[1]])
        else:  # the top-ranked sources only (ranked order = marker order)
            source = "\n".join(s.text for s in p.sources[:n_top])
        return ValueCopy(source, self._token_texts, stop_ids=stop, answer_start=plan["answer_start"])

    def _similarity(self, question: str, texts: list[str]) -> list[float]:
        """Cosine of ``question`` to each text with the index's embedder; shared content words without one."""
        if self.index.dense_enabled:
            v = self.index.embed([question, *texts])  # (1 + N, dim) unit vectors
            return [float(x) for x in v[1:] @ v[0]]
        q = content_words(question)
        return [float(len(q & content_words(t))) for t in texts]

    def _decide(self, question: str, route: str, value_kind: str | None) -> Any:
        """The caller's route, or the router's; the router's comprehension becomes fused for a value question
        (``value_kind``, with value answers on): the corpus memory does not keep exact values, the sources do."""
        from router import RouteDecision

        if route != "auto":
            return RouteDecision(route=route, confidence=1.0, reason="route chosen by the caller")
        d = self.router.route(question)
        if d.route == "comprehension" and value_kind is not None:
            why = f"{d.reason}; a value question: fused, so the values come from sources"
            return dataclasses.replace(d, route="fused", reason=why)
        return d

    def _plan(
        self, question: str, route: str, top_k: int | None, max_new_tokens: int | None, answer_start: str
    ) -> dict[str, Any]:
        """Validate, route, retrieve, fetch the memory and build the prompt (everything before decoding)."""
        t0 = time.perf_counter()
        q = check_question(question)
        if not isinstance(answer_start, str):
            raise InvalidQuestionError(f"answer_start must be a string, got {type(answer_start).__name__}")
        if route not in ("auto", *ROUTES):
            raise UnknownRouteError(f"unknown route {route!r}; choose from {('auto', *ROUTES)}")
        k = self.config.top_k if top_k is None else top_k
        max_new = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(k, int) or k < 1 or not isinstance(max_new, int) or max_new < 1:
            raise InvalidQuestionError(f"top_k and max_new_tokens must be integers >= 1, got {k}, {max_new}")
        if not self.index.documents():
            raise NotIngestedError("no documents ingested yet: call ingest() before answer()")
        reader, start = self.config.reader, answer_start
        value_kind = value_question(q) if reader.value_answers else None  # 'one' | 'many' | None
        reserve = max_new  # answer tokens the prompt leaves room for in the window
        if value_kind is not None:  # values are short: more sources fit
            reserve = min(max_new, reader.value_answer_tokens)
        budget = token_budget(self.model.cfg.window, reserve, self.config.reader)
        if budget < 8:
            raise InvalidQuestionError(f"max_new_tokens={max_new} leaves no room for a prompt in the window")
        build_prompt(q, [], self.tokenizer, budget=budget, cfg=reader, answer_start=start)  # too long: early
        timings: dict[str, float] = {}
        t = time.perf_counter()
        decision = self._decide(q, route, value_kind)
        timings["route"] = time.perf_counter() - t
        hits: list[Any] = []
        if decision.route in ("lookup", "fused"):
            t = time.perf_counter()
            hits = self.index.search(q, k=k, mode=self.config.search_mode)
            timings["retrieve"] = time.perf_counter() - t
        state, rebuilt, version, mem_tokens = None, False, None, 0
        if decision.route in ("comprehension", "fused"):
            t = time.perf_counter()
            shared, meta, rebuilt = self.memory_state()
            state, version, mem_tokens = shared.clone(), meta.version, meta.tokens_read  # per-request copy
            timings["memory_rebuild" if rebuilt else "memory"] = time.perf_counter() - t
        prompt = build_prompt(q, hits, self.tokenizer, budget=budget, cfg=reader, answer_start=start)
        contrast = None  # context-aware decoding: the same question without its sources
        if decision.route == "lookup" and reader.context_contrast > 0 and prompt.sources:
            bare = build_prompt(q, [], self.tokenizer, budget=budget, cfg=reader, answer_start=start)
            contrast = torch.tensor([bare.ids], dtype=torch.long, device=self.device)
        return {
            "question": q,
            "value_kind": value_kind,
            "answer_start": start,
            "contrast": contrast,
            "t0": t0,
            "route": decision.route,
            "decision": decision,
            "prompt": prompt,
            "state": state,
            "max_new": max_new,
            "timings": timings,
            "rebuilt": rebuilt,
            "memory_version": version,
            "memory_tokens": mem_tokens,
        }


def check_question(question: Any) -> str:
    if not isinstance(question, str):
        raise InvalidQuestionError(f"the question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise EmptyQuestionError("the question is empty")
    return question.strip()


def _stop_at(text: str, stop: Sequence[str] | None) -> int | None:
    """Index of the earliest stop string in ``text`` (None if none occurs)."""
    hits = [text.find(s) for s in (stop or []) if s and s in text]
    return min(hits) if hits else None


def stream_text(
    steps: Iterable[torch.Tensor], tok: Any, stop: Sequence[str] | None, ids: list[int]
) -> Iterator[str]:
    """Decode (B=1) token steps into text pieces, ending at eos or before the first stop string.

    Appends every generated id (eos excluded) to ``ids``; the pieces join to the final text.
    """
    text = ""
    hold = max((len(s) for s in stop or [] if s), default=1) - 1  # a stop string may be arriving
    for step in steps:
        if int(step[0]) == tok.eos_id:
            break
        ids.append(int(step[0]))
        full = tok.decode(ids)
        if full.endswith("\ufffd"):  # maybe an incomplete multi-byte character: wait for the rest
            continue
        cut = _stop_at(full, stop)
        safe = full[:cut] if cut is not None else full[: len(full) - hold]
        if safe.startswith(text) and len(safe) > len(text):
            yield safe[len(text) :]
            text = safe
        if cut is not None:
            return
    full = tok.decode(ids)  # flush what an unfinished character held back
    cut = _stop_at(full, stop)
    full = full if cut is None else full[:cut]
    if full.startswith(text) and len(full) > len(text):
        yield full[len(text) :]


def read_tokens(model: Any, ids: list[int], state: Any, block: int, progress: bool = False) -> Any:
    """Prefill ``ids`` in blocks of ``block`` tokens, continuing ``state``; returns the new state."""
    if not ids:
        return state
    device = next(model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), unit="tok", desc="reading corpus")
    with torch.no_grad():
        for s in range(0, len(ids), block):
            part = torch.tensor([ids[s : s + block]], dtype=torch.long, device=device)  # (1, T)
            state = model.prefill(part, state).state
            if bar is not None:
                bar.update(part.shape[1])
    if bar is not None:
        bar.close()
    return state


def load_model(model_dir: str | Path | None, device: str | None = None) -> tuple[Any, Any]:
    """(TTTModel, Tokenizer) from ``model_dir``; None -> the shipped model, else a random debug model."""
    from ttt import TTTModel
    from ttt.tokenizer import Tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_dir is None and DEFAULT_MODEL_DIR.exists():
        model_dir = DEFAULT_MODEL_DIR
    if model_dir is None:
        log.warning(
            "no trained model at %s: using a RANDOM debug model with the byte-level tokenizer "
            "(answers are noise; routes, retrieval and sources are real)",
            DEFAULT_MODEL_DIR,
        )
        return random_debug_model(device=device), Tokenizer.byte_level()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a model dir (config.json missing)")
    model = TTTModel.from_pretrained(model_dir, device=device)
    if model.tok_emb.weight.device.type == "cpu":
        # checkpoints ship in bf16; CPU bf16 matmuls measured ~10x slower than fp32 (2048-token prefill of the
        # reference model: 20.8 s vs 1.7 s on 2 cores), and the upcast is exact
        model = model.float()
    tok_path = model_dir / "tokenizer.json"
    tok = Tokenizer.from_pretrained(model_dir) if tok_path.exists() else Tokenizer.byte_level()
    return model, tok


def random_debug_model(seed: int = 0, device: str = "cpu", **overrides: Any) -> Any:
    """The ``debug`` preset, seeded: a window wide enough for a reader prompt, b = 256 (fewer inner steps on
    CPU) and vocab 260 = the byte-level tokenizer's, so every sampled id decodes to text."""
    from ttt import ModelConfig, TTTModel

    cfg = ModelConfig.from_name(
        "debug", **({"window": 1024, "ttt_chunk": 256, "vocab_size": 260} | overrides)
    )
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        model = TTTModel(cfg)
    return model.to(device).eval()
