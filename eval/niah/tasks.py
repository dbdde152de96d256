"""NIAH tasks: RULER's 8 NIAH configs, gkamradt's single needle, a low-lexical-overlap variant, custom needles.

Templates are RULER's, verbatim (scripts/data/synthetic/constants.py:27-28, niah.py:83, 189, 193-198); see
``docs`` in ``../shared/docs/niah.md``. Every sample is generated from its own RNG, seeded from
``(seed, task, length, depth, index)``, so any sample can be rebuilt alone and a fixed seed always gives the
same dataset (``dataset_hash``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

# ---- exact strings (RULER / gkamradt) ---------------------------------------------------------------------
RULER_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
RULER_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
RULER_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
GK_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
GK_QUESTION = "What is the best thing to do in San Francisco?"
GK_TEMPLATE = "{context}\n\n{question} Don't give information outside the document or repeat your findings\n"
GK_PREFILL = "Here is the most relevant sentence in the context:"  # gkamradt's Anthropic prompt prefill
GK_ANSWERS = ["eat a sandwich", "Dolores Park"]
LOWLEX_NEEDLE = "The vault code for the {adj} {noun} is {value}."
LOWLEX_QUESTION = "Which number unlocks the safe of the {adj} {noun}?"
LOWLEX_TEMPLATE = (
    "Some facts are hidden within the following text. Make sure to memorize them.\n{context}\n{question}"
)
LOWLEX_PREFIX = " Answer: the number is"
CUSTOM_TEMPLATE = "{context}\n\nQuestion: {question}"
WORDLISTS_ENV = "TTT_RAG_WONDERWORDS_DIR"  # a dir with adjectivelist.txt + nounlist.txt (no wonderwords pkg)
CUSTOM_PREFIX = "\nAnswer:"

# Synonym pairs for the low-overlap variant: the needle uses one side, the question the other, so the
# question shares no content word with the needle (NoLiMa-style; BM25 on the question cannot find it).
LOWLEX_ADJ = [
    ("crimson", "scarlet"), ("tiny", "minuscule"), ("enormous", "gigantic"), ("ancient", "antique"),
    ("swift", "rapid"), ("silent", "quiet"), ("gleaming", "shiny"), ("frozen", "icy"), ("furious", "angry"),
    ("cheerful", "joyful"), ("timid", "shy"), ("wealthy", "rich"), ("sleepy", "drowsy"), ("damp", "moist"),
    ("filthy", "dirty"), ("clever", "smart"), ("brave", "courageous"), ("odd", "peculiar"),
    ("sturdy", "robust"), ("fragile", "delicate"), ("gloomy", "dismal"), ("hungry", "starving"),
    ("polite", "courteous"), ("noisy", "loud"), ("tidy", "neat"), ("elderly", "aged"), ("slender", "slim"),
    ("wicked", "evil"), ("massive", "huge"), ("tranquil", "calm"),
]  # fmt: skip
LOWLEX_NOUN = [
    ("automobile", "car"), ("physician", "doctor"), ("sofa", "couch"), ("boulder", "rock"),
    ("ship", "vessel"), ("infant", "baby"), ("rabbit", "bunny"), ("attorney", "lawyer"), ("cap", "hat"),
    ("purse", "handbag"), ("present", "gift"), ("shop", "store"), ("pupil", "student"), ("chef", "cook"),
    ("canine", "dog"), ("feline", "cat"), ("residence", "house"), ("mariner", "sailor"),
    ("garbage", "trash"), ("lantern", "lamp"), ("trousers", "pants"), ("photograph", "picture"),
    ("beverage", "drink"), ("painter", "artist"), ("cottage", "cabin"), ("monarch", "king"),
    ("jewel", "gem"), ("professor", "lecturer"), ("pistol", "handgun"), ("hill", "mound"),
]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One NIAH task. ``family`` picks the template; RULER fields mirror synthetic.yaml."""

    name: str
    family: str  # "ruler" | "gkamradt" | "lowlex" | "custom"
    haystack: str  # "noise" | "essay" | "needle" (a haystack made of distractor needles)
    type_k: str = "words"  # key generator: words | numbers | uuids
    type_v: str = "numbers"  # value generator: numbers | uuids
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1
    ruler_name: str = ""

    @property
    def value_pattern(self) -> str | None:
        """Regex for the answer value type (regex baseline), None when values are free text."""
        if self.family in ("ruler", "lowlex"):
            return r"\b\d{7}\b" if self.type_v == "numbers" else UUID_RE
        return None

    @property
    def n_answers(self) -> int:
        return self.num_q * self.num_v if self.family == "ruler" else 1


UUID_RE = r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(name="s-niah-1", family="ruler", haystack="noise", ruler_name="niah_single_1"),
        TaskSpec(name="s-niah-2", family="ruler", haystack="essay", ruler_name="niah_single_2"),
        TaskSpec(
            name="s-niah-3", family="ruler", haystack="essay", type_v="uuids", ruler_name="niah_single_3"
        ),
        TaskSpec(name="mk-niah-1", family="ruler", haystack="essay", num_k=4, ruler_name="niah_multikey_1"),
        TaskSpec(name="mk-niah-2", family="ruler", haystack="needle", ruler_name="niah_multikey_2"),
        TaskSpec(
            name="mk-niah-3",
            family="ruler",
            haystack="needle",
            type_k="uuids",
            type_v="uuids",
            ruler_name="niah_multikey_3",
        ),  # fmt: skip
        TaskSpec(name="mv-niah", family="ruler", haystack="essay", num_v=4, ruler_name="niah_multivalue"),
        # num_needle_k is raised to max(k, q) = 4 (RULER niah.py:77)
        TaskSpec(
            name="mq-niah", family="ruler", haystack="essay", num_k=4, num_q=4, ruler_name="niah_multiquery"
        ),
        TaskSpec(name="gk-niah", family="gkamradt", haystack="essay"),
        # NoLiMa-style paraphrased key (niah.md §5): one needle, the question names its key by synonyms only
        TaskSpec(name="lowlex-niah", family="lowlex", haystack="essay", num_k=1),
        # ... plus 3 distractor needles of the same form (the reader must also tell synonyms apart)
        TaskSpec(name="lowlex-mk-niah", family="lowlex", haystack="essay", num_k=4),
        TaskSpec(name="custom", family="custom", haystack="essay"),
    ]
}
RULER_TASK_NAMES = [n for n, t in TASKS.items() if t.family == "ruler"]


@dataclass(kw_only=True)
class CustomNeedle:
    needle: str
    question: str
    answer: list[str]


@dataclass(kw_only=True)
class Sample:
    """One generated prompt. ``prompt`` = ``input`` + ``answer_prefix`` is what a reader model consumes."""

    task: str
    index: int
    target_length: int
    depth: float  # requested depth (percent of the context, in tokens) of the first queried needle
    input: str
    answer_prefix: str
    question: str  # the question alone (retrieval systems search with it)
    outputs: list[str]  # references for string_match_all
    needles: list[str]  # queried needle sentences (first = the one placed at ``depth``)
    context: str  # the haystack with all needles (retrieval systems index it)
    n_tokens: int = 0  # token length of ``prompt`` under the model's tokenizer
    needle_token_pos: int = -1  # token index where the first queried needle starts in ``prompt``
    n_units: int = 0  # haystack size in units (word pieces or distractor lines)
    context_token_start: int = 0  # token index where the haystack starts in ``prompt``
    context_n_tokens: int = 0  # token length of the haystack (needles included)
    extra: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix

    @property
    def needle_depth(self) -> float:
        """Where the first queried needle starts, in percent of the haystack's tokens."""
        return 100.0 * (self.needle_token_pos - self.context_token_start) / max(1, self.context_n_tokens)


# ---- key / value generators ------------------------------------------------------------------------------
@cache
def _wordlists() -> tuple[list[str], list[str]]:
    """wonderwords 3.0.1 adjective and noun lists (what RULER loads): from ``$TTT_RAG_WONDERWORDS_DIR`` when
    set, else the package, else ``../shared/data/ruler/wonderwords_3.0.1``."""
    from eval.niah.haystack import REPO_ROOT

    env = os.environ.get(WORDLISTS_ENV)
    if not env:
        try:
            from importlib.resources import files

            base = files("wonderwords") / "assets"
            return (
                base.joinpath("adjectivelist.txt").read_text().split(),
                base.joinpath("nounlist.txt").read_text().split(),
            )
        except (ImportError, FileNotFoundError):
            pass
    d = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "ruler" / "wonderwords_3.0.1"
    if not (d / "adjectivelist.txt").is_file() or not (d / "nounlist.txt").is_file():
        raise ImportError(
            f"RULER keys need wonderwords' word lists: pip install 'ttt-rag[eval]' or set {WORDLISTS_ENV} "
            f"to a dir with adjectivelist.txt and nounlist.txt ({d} has none)"
        )
    adj = (d / "adjectivelist.txt").read_text().split()
    noun = (d / "nounlist.txt").read_text().split()
    return adj, noun


def gen_random(kind: str, rng: random.Random) -> str:
    """RULER's generators: ``words`` adjective-noun, ``numbers`` 7 digits, ``uuids`` UUID4 (niah.py:108-118)."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        adj, noun = _wordlists()
        return f"{rng.choice(adj)}-{rng.choice(noun)}"
    raise ValueError(f"unknown key/value type {kind!r}; expected words, numbers or uuids")


def ruler_render(spec: TaskSpec, context: str, query: str) -> tuple[str, str]:
    """RULER's template + answer prefix with its singular rewrite; returns ``(input, answer_prefix)`` split at
    the last occurrence of the prefix's first 10 characters (niah.py:193-198, 277-291)."""
    template = RULER_TEMPLATE + RULER_ANSWER_PREFIX
    type_v = spec.type_v
    if spec.num_q * spec.num_v == 1:
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(a, b)
        type_v = type_v[:-1]
    text = template.format(type_needle_v=type_v, context=context, query=query)
    prefix = RULER_ANSWER_PREFIX.format(type_needle_v=type_v, query=query)
    if spec.num_q * spec.num_v == 1:
        prefix = prefix.replace("are", "is")
    cut = text.rfind(prefix[:10])
    return text[:cut], text[cut:]


def load_needles(path: str | Path) -> list[CustomNeedle]:
    """Custom needles from JSONL, one ``{"needle", "question", "answer"}`` object per line (answer: str or list)."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        missing = (
            [k for k in ("needle", "question", "answer") if not row.get(k)]
            if isinstance(row, dict)
            else ["all"]
        )
        if missing:
            raise ValueError(
                f"{path}:{i}: needs non-empty fields needle, question, answer (missing {missing})"
            )
        ans = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        out.append(
            CustomNeedle(
                needle=str(row["needle"]).strip(), question=str(row["question"]), answer=[str(a) for a in ans]
            )
        )
    if not out:
        raise ValueError(f"{path}: no needles found")
    return out


def dataset_hash(samples: Sequence[Sample]) -> str:
    """sha256 over every sample's identity, prompt and references (same seed -> same hash)."""
    h = hashlib.sha256()
    for s in samples:
        row = [s.task, s.index, s.target_length, s.depth, s.prompt, s.outputs]
        h.update(json.dumps(row, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def sample_to_dict(s: Sample) -> dict:
    return asdict(s)
