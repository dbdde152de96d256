"""Systems under test. Each gets a fresh state for every sample (no TTT state, index or store is reused).

* ``ttt``   the TTT-E2E model reads the whole prompt (one prefill, TTT on), then decodes greedily.
* ``swa``   the same checkpoint with the inner learning rate set to 0: fast weights stay W0 (plain SWA).
* ``full``  the full-attention control: ``--full-model DIR`` when given, else the same weights with
            ``window=None`` and no TTT update; skipped where the prompt is longer than ``max_full_len``.
* ``retrieval`` BM25 + dense (RRF) top-k chunks of the haystack replace it in the prompt; the model reads that.
* ``bm25`` / ``dense`` recall@k only: the score is string_match_all of the references against the top-k text.
* ``regex`` the value-pattern baseline (7 digits / UUID), capped at the number of requested answers.
* ``hybrid`` / ``fused`` ``HybridRAG`` (the loaded model, a fresh store) with ``route="auto"`` / ``"fused"``:
            the question alone, as a user asks it.
* ``hybrid-prefix`` ablation: ``hybrid`` answering after RULER's answer prefix (``answer_start``), the prefix
            the model-only systems get (niah.md §1.1). It hurts the shipped reader (fine-tuned to answer right
            after "Answer:"): 2026-12-07 CPU, 24 paired s-niah samples, s-niah-3 0 of 8 against 5 of 8.
* ``hybrid-copy`` ablation: ``hybrid`` with copy-constrained lookup answers (``ReaderConfig(extractive=True)``,
            ``hybrid/extractive.py``).
* ``hybrid-copy1`` ablation: ``hybrid-copy`` copying values from the top-ranked source only
            (``ReaderConfig(extractive=True, extractive_sources=1)``).
* ``hybrid-value`` ``hybrid`` answering value questions with source values only
            (``ReaderConfig(value_answers=True)``, ``hybrid.extractive.ValueAnswer``): the default since
            2026-12-07, so ``hybrid`` equals it; results made before that call free generation ``hybrid``.
* ``hybrid-free`` ablation: ``hybrid`` generating freely (``value_answers=False``: the default before 2026-12-07).
* ``hybrid-cad`` ablation: ``hybrid`` with context-aware decoding of lookup answers
            (``ReaderConfig(context_contrast=0.5)``).

The ablations (``hybrid-*`` but ``hybrid-value``) generate freely apart from their own rule (``value_answers=False``), as
when they were measured.

Per-sample setup (the retrieval index; the HybridRAG store with the haystack ingested, shared by hybrid and
fused) is built by ``prepare`` and timed apart from the answer (``prepare_s`` vs ``latency_s``).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eval.niah.scoring import postprocess_pred
from eval.niah.tasks import TASKS, Sample

log = logging.getLogger(__name__)

RAG_SYSTEMS = (
    "hybrid",
    "fused",
    "hybrid-prefix",
    "hybrid-copy",
    "hybrid-copy1",
    "hybrid-value",
    "hybrid-free",
    "hybrid-cad",
)  # each a HybridRAG per sample
SYSTEMS = ("ttt", "swa", "full", "retrieval", "bm25", "dense", "regex", *RAG_SYSTEMS)
GENERATIVE = ("ttt", "swa", "full", "retrieval", *RAG_SYSTEMS)


@dataclass(kw_only=True)
class Prediction:
    text: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class SystemsConfig:
    """What every system shares. ``model_dir=None`` = a randomly initialised ``debug`` model (smoke runs)."""

    model_dir: str | None = None
    full_model_dir: str | None = None  # a separately trained full-attention checkpoint for ``full``
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16
    max_new_tokens: int = 128  # RULER's NIAH budget; identical for every generative system
    top_k: int = 5  # retrieved chunks (retrieval, bm25, dense, hybrid)
    max_full_len: int | None = None  # ``full`` runs only up to this prompt length (None = always)
    seed: int = 0  # init seed of the random debug model
    embedder_dir: str | None = None  # sentence-transformers dir (e.g. an int8 export); None = the package's
    # how ttt/swa/full/retrieval wrap RULER's task input before its answer prefix (RULER's "chat template"):
    # "base" = input + prefix; "reader" = input + "\nAnswer:" + prefix, the turn marker of our reader fine-tune
    chat_template: str = "base"

    def __post_init__(self) -> None:
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(
                f"unknown chat template {self.chat_template!r}; choose from {list(CHAT_TEMPLATES)}"
            )


# RULER wraps the task input in the model's chat template and appends the answer prefix after the assistant
# turn (niah.md §1.1); ours: "{input}{assistant}{answer_prefix}"
CHAT_TEMPLATES = {"base": "", "reader": "\nAnswer:"}


def wrap_prompt(input_text: str, answer_prefix: str, template: str) -> str:
    """RULER's prompt for one chat template: the task input, the template's assistant turn, the answer prefix."""
    return input_text + CHAT_TEMPLATES[template] + answer_prefix


class LMRunner:
    """Owns the model(s) and tokenizer; ``generate(prompt_text)`` decodes greedily from a fresh state."""

    def __init__(self, cfg: SystemsConfig) -> None:
        import torch

        from ttt import ModelConfig, TTTModel
        from ttt.tokenizer import Tokenizer

        self.cfg, self._torch = cfg, torch
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        if cfg.model_dir is None:
            torch.manual_seed(cfg.seed)
            self.tokenizer = Tokenizer.byte_level()
            base = TTTModel(ModelConfig.from_name("debug", bos_id=self.tokenizer.bos_id))
        else:
            self.tokenizer = Tokenizer.from_pretrained(cfg.model_dir)
            base = TTTModel.from_pretrained(cfg.model_dir, device="cpu")
        self.model_cfg = base.cfg
        self.models: dict[str, Any] = {"ttt": base.to(device=cfg.device, dtype=dtype).eval()}
        self._dtype = dtype
        self._base_state = base.state_dict()

    def variant(self, name: str) -> Any:
        """``ttt`` / ``swa`` (ttt_lr=0) / ``full`` (window=None, ttt_lr=0, or ``full_model_dir``), built lazily."""
        if name not in self.models:
            from ttt import TTTModel

            if name == "full" and self.cfg.full_model_dir:
                m = TTTModel.from_pretrained(self.cfg.full_model_dir, device="cpu")
            else:
                over = {"ttt_lr": 0.0} | ({"window": None} if name == "full" else {})
                m = TTTModel(self.model_cfg.replace(**over))
                m.load_state_dict(self._base_state)
            self.models[name] = m.to(device=self.cfg.device, dtype=self._dtype).eval()
        return self.models[name]

    def window(self, name: str) -> int | None:
        return self.variant(name).cfg.window

    def generate(self, text: str, name: str = "ttt") -> str:
        torch = self._torch
        tok = self.tokenizer
        ids = tok.encode(text, add_bos=True)
        x = torch.tensor([ids], dtype=torch.long, device=self.cfg.device)  # (1, T)
        with torch.no_grad():
            out = self.variant(name).generate(x, max_new_tokens=self.cfg.max_new_tokens, eos_id=tok.eos_id)
        return tok.decode(out[0].tolist())


class _IndexCache:
    """One fresh retrieval index per sample, shared by bm25/dense/retrieval on that sample only."""

    def __init__(self, dense: bool, embedder: Callable[[], Any]) -> None:
        self.dense, self._embedder = dense, embedder
        self._key: tuple | None = None
        self._idx: Any = None
        self._dir: str | None = None

    def get(self, s: Sample) -> Any:
        key = (s.task, s.target_length, s.depth, s.index)
        if key != self._key:
            from retrieval import Index

            self.close()
            emb = self._embedder() if self.dense else None
            self._dir = tempfile.mkdtemp(prefix="niah-idx-")
            self._idx = Index.create(Path(self._dir) / "store", dense=self.dense, embedder=emb)
            self._idx.add([("haystack", s.context)])
            self._key = key
        return self._idx

    def close(self) -> None:
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._key, self._idx, self._dir = None, None, None


def _hits_in_doc_order(hits: list[Any]) -> list[Any]:
    return sorted(hits, key=lambda h: h.chunk.start)


class Systems:
    """Factory + dispatcher: ``predict(name, sample)`` -> Prediction, ``skip_reason(name, sample)``."""

    def __init__(self, cfg: SystemsConfig, names: list[str]) -> None:
        unknown = [n for n in names if n not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
        self.cfg, self.names = cfg, names
        self._lm: LMRunner | None = None
        self._index = _IndexCache(dense=bool({"dense", "retrieval"} & set(names)), embedder=self.embedder)
        self._router: Any = None
        self._embedder: Any = None
        self._rag: tuple[tuple, Any, str] | None = None  # (sample key, HybridRAG, store tmp dir)

    def embedder(self) -> Any:
        """The one sentence embedder (``cfg.embedder_dir`` or the package's MiniLM) on ``cfg.device``."""
        if self._embedder is None:
            from retrieval.embedder import Embedder

            d = self.cfg.embedder_dir
            self._embedder = Embedder(d, device=self.cfg.device) if d else Embedder.default(self.cfg.device)
        return self._embedder

    def router(self) -> Any:
        """The shipped router (``router/data``), sharing this run's embedder."""
        if self._router is None:
            from router import Router

            self._router = Router.load_default(embedder=self.embedder())
        return self._router

    @property
    def lm(self) -> LMRunner:
        if self._lm is None:
            self._lm = LMRunner(self.cfg)
        return self._lm

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    def window(self, name: str) -> int | None:
        """Attention window of the model behind ``name`` (None = full attention / not a windowed reader)."""
        if name in ("ttt", "swa", "full"):
            return self.lm.window(name)
        return None

    def skip_reason(self, name: str, s: Sample) -> str | None:
        if name == "regex" and TASKS[s.task].value_pattern is None:
            return "no value pattern for this task"
        if name == "full" and self.cfg.max_full_len is not None and s.n_tokens > self.cfg.max_full_len:
            return f"prompt {s.n_tokens} > max_full_len {self.cfg.max_full_len}"
        return None

    def predict(self, name: str, s: Sample) -> Prediction:
        fn: dict[str, Callable[[Sample], Prediction]] = {
            "ttt": lambda s: Prediction(text=self.lm.generate(self._prompt(s), "ttt")),
            "swa": lambda s: Prediction(text=self.lm.generate(self._prompt(s), "swa")),
            "full": lambda s: Prediction(text=self.lm.generate(self._prompt(s), "full")),
            "retrieval": self._retrieval,
            "bm25": lambda s: self._recall(s, "bm25"),
            "dense": lambda s: self._recall(s, "dense"),
            "regex": self._regex,
            "hybrid": lambda s: self._hybrid(s, "auto"),
            "fused": lambda s: self._hybrid(s, "fused"),
            "hybrid-prefix": lambda s: self._hybrid(s, "auto", prefix=True, value_answers=False),
            "hybrid-copy": lambda s: self._hybrid(s, "auto", extractive=True, value_answers=False),
            "hybrid-copy1": lambda s: self._hybrid(
                s, "auto", extractive=True, extractive_sources=1, value_answers=False
            ),
            "hybrid-value": lambda s: self._hybrid(s, "auto", value_answers=True),
            "hybrid-free": lambda s: self._hybrid(s, "auto", value_answers=False),
            "hybrid-cad": lambda s: self._hybrid(s, "auto", context_contrast=0.5, value_answers=False),
        }
        p = fn[name](s)
        p.text = postprocess_pred(p.text)
        return p

    def _prompt(self, s: Sample) -> str:
        return wrap_prompt(s.input, s.answer_prefix, self.cfg.chat_template)

    def _regex(self, s: Sample) -> Prediction:
        spec = TASKS[s.task]
        found = re.findall(spec.value_pattern or "", s.context)
        return Prediction(text=", ".join(found[: spec.n_answers]), extra={"n_matches": len(found)})

    def _recall(self, s: Sample, mode: str) -> Prediction:
        hits = self._index.get(s).search(s.question, k=self.cfg.top_k, mode=mode)
        text = "\n".join(h.chunk.text for h in hits)
        return Prediction(text=text, extra={"chunks": [h.chunk.id for h in hits]})

    def _retrieval(self, s: Sample) -> Prediction:
        hits = self._index.get(s).search(s.question, k=self.cfg.top_k, mode="hybrid")
        retrieved = "\n".join(h.chunk.text for h in _hits_in_doc_order(hits))
        assert s.context in s.input, "sample context not found in its input"
        prompt = wrap_prompt(
            s.input.replace(s.context, retrieved, 1), s.answer_prefix, self.cfg.chat_template
        )
        return Prediction(text=self.lm.generate(prompt, "ttt"), extra={"chunks": [h.chunk.id for h in hits]})

    def prepare(self, name: str, s: Sample) -> float:
        """Build what ``name`` needs for ``s`` before it is timed (retrieval index; HybridRAG store with the
        corpus ingested); returns the seconds spent (0 when already built for this sample or not needed)."""
        t0 = time.perf_counter()
        if name in ("retrieval", "bm25", "dense"):
            self._index.get(s)
        elif name in RAG_SYSTEMS:
            self._rag_for(s)
        return round(time.perf_counter() - t0, 4)

    def _rag_for(self, s: Sample) -> Any:
        """A fresh ``HybridRAG`` per sample (new store: index + TTT memory of this haystack), shared by
        ``hybrid`` and ``fused`` on that sample only; answering never mutates the stored memory."""
        from hybrid.rag import HybridRAG
        from retrieval import Index

        key = (s.task, s.target_length, s.depth, s.index)
        if self._rag is None or self._rag[0] != key:
            self._close_rag()
            tmp = tempfile.mkdtemp(prefix="niah-hybrid-")
            try:
                index = Index.create(Path(tmp) / "store", embedder=self.embedder())
                rag = HybridRAG(self.lm.variant("ttt"), self.lm.tokenizer, index, router=self.router())
                rag.ingest([("haystack", s.context)])
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._rag = (key, rag, tmp)
        return self._rag[1]

    def _hybrid(self, s: Sample, route: str, prefix: bool = False, **reader_options: Any) -> Prediction:
        """``HybridRAG.answer`` of the question (continuing RULER's answer prefix when ``prefix``);
        ``reader_options`` override fields of the store's ``ReaderConfig`` for this call only."""
        rag = self._rag_for(s)
        reader = rag.config.reader
        rag.config.reader = replace(reader, **reader_options)  # the shared store, this call's reader
        try:
            ans = rag.answer(
                s.question,
                route=route,
                top_k=self.cfg.top_k,
                max_new_tokens=self.cfg.max_new_tokens,
                answer_start=s.answer_prefix if prefix else "",
            )
        finally:
            rag.config.reader = reader
        return Prediction(text=ans.text, extra={"route": ans.route})

    def _close_rag(self) -> None:
        if self._rag is not None:
            shutil.rmtree(self._rag[2], ignore_errors=True)
            self._rag = None

    def close(self) -> None:
        self._index.close()
        self._close_rag()
