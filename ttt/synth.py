"""Synthetic reading documents made from ONE training book at a time (mixed into the training stream).

Each document is a passage cut from the book followed by a question about it, in the one format the model
is trained to answer (``qa_prompt``)::

    <passage>

    Question: <question>
    Answer: <answer><|eos|>

Kinds (chosen with ``SynthConfig.weights``, uniform by default):
  - ``continue``: quote the first words of a sentence of the passage; the answer is the words that follow.
  - ``copy``: "Repeat this line exactly: <sentence>"; the answer is the sentence.
  - ``number``: a sentence "<Name> wrote down the number <digits>." (Name taken from the passage, 5-9 random
    digits) is inserted at a random paragraph break; the question asks for that number.
  - ``kv`` (key-value lookup, ``kv_example``): 1-8 facts "<attribute> of <key> is <value>" in our own phrasings
    are inserted at random sentence boundaries of a passage of ~100-1800 tokens; the question asks for one
    key's value (the other facts are distractors), all values of one key, or the values of 2-3 keys. The
    answer is the bare value(s) or a sentence that restates the key, then copies the value. A share of kv
    docs uses the hybrid reader's layout (numbered sources, ``SOURCES_HEADER``) instead of ``qa_prompt``.

The share of synthetic TOKENS in the training stream is ``SynthConfig.share`` (default 10%; measured in
characters at generation time, recorded exactly in tokens by ``ttt.data.build_shards``). Nothing here uses
evaluation material: no RULER/NIAH templates or phrases (``BANNED`` is checked on every document), no essay
haystack; only the training book passed in.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field

QUESTION = "Question: "
ANSWER = "Answer:"
KINDS = ("continue", "copy", "number", "kv")
DEFAULT_KINDS = ("continue", "copy", "number")  # the mix the shipped reference models were trained on
# The hybrid reader's prompt header (hybrid.reader.ReaderConfig.header; a test keeps the two equal).
SOURCES_HEADER = "Use the numbered sources to answer. Cite them like [1].\n"
# Evaluation phrases (RULER / NIAH prompts) that must never occur in a synthetic document (lower case).
BANNED = (
    "special magic",
    "magic number",
    "mentioned in the provided text",
    "make sure to memorize",
    "i will quiz you",
    "hidden within the following text",
    "dolores park",
    "best thing to do in san francisco",
)

_SENT_RE = re.compile(r"(?<=[.!?\u201d])\s+(?=[A-Z\"'\u201c\u2018])")
_BOUNDARY_RE = re.compile(r"(?<=[.!?\u201d])[ \n]+(?=[A-Z\"'\u201c\u2018])|\n\n+")
_ABBREV = ("Mr.", "Mrs.", "Dr.", "St.", "Mme.", "Jr.", "Messrs.", "Capt.", "Col.", "Gen.", "Rev.")
_NAME_RE = re.compile(r"(?<=[a-z,;] )[A-Z][a-z]{2,14}\b")
_WORD_RE = re.compile(r"\b[a-z]{4,10}\b")
_NUMBER_FACTS = (  # (statement, question); our own phrasings
    ("{name} wrote down the number {n}.", "What number did {name} write down?"),
    ("The number on {name}'s door was {n}.", "What was the number on {name}'s door?"),
    ("{name} kept the receipt numbered {n}.", "What was the number of the receipt {name} kept?"),
)
_STOP = frozenset(
    "that this with from have were which their there would could should about into than then them these "
    "those what when where while your yours very upon such some said more most much only other over been "
    "being also just like well even ever here must shall will what whom whose magic special".split()
)

# ---- key-value facts (kind "kv") ---------------------------------------------------------------------
# attribute -> value kinds it may hold ("number": 5-9 digits, "uuid": uuid4, "words": 2-3 book words)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "access code": ("number", "uuid", "words"),
    "locker number": ("number",),
    "serial": ("number", "uuid"),
    "password": ("number", "uuid", "words"),
    "ID": ("number", "uuid"),
    "passphrase": ("words",),
    "account number": ("number",),
    "ticket number": ("number",),
    "tracking code": ("number", "uuid"),
    "door code": ("number",),
    "token": ("uuid", "words"),
    "codeword": ("words",),
}
# ``SynthConfig.kv_attributes="wide"`` adds these (multi-word names, so a reader learns to copy whatever the
# attribute is called; none is an evaluation phrase). The held-out question set keeps the base list.
WIDE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "lucky number": ("number",),
    "reference number": ("number", "uuid"),
    "secret code": ("number", "uuid", "words"),
    "confirmation code": ("number", "uuid"),
    "registration number": ("number",),
    "room number": ("number",),
    "catalogue number": ("number",),
    "hidden key": ("uuid", "words"),
    "private identifier": ("uuid",),
    "favourite number": ("number",),
    "launch code": ("number", "uuid"),
    "secret phrase": ("words",),
    "order number": ("number",),
    "combination": ("number",),
    "license key": ("uuid",),
    "hidden word": ("words",),
}
# SynthConfig.kv_attributes -> the attribute table kv documents draw from (built once, not per document)
ATTRIBUTE_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "base": ATTRIBUTES,
    "wide": {**ATTRIBUTES, **WIDE_ATTRIBUTES},
}
STATEMENTS = (  # one fact; {key} {attr} {value}
    "The {attr} for {key} is {value}.",
    "{key}'s {attr} was {value}.",
    "Remember that the {attr} of {key} is {value}.",
    "For {key}, the {attr} was written down as {value}.",
    "Someone noted that {key} had the {attr} {value}.",
    "The {attr} assigned to {key} was {value}.",
    "{value} is the {attr} that belongs to {key}.",
    "On the card it said that {key} uses the {attr} {value}.",
    "In the ledger, the {attr} listed under {key} reads {value}.",
    "They agreed that the {attr} for {key} would be {value}.",
    "{key} was given {value} as the {attr}.",
    "Write this down: the {attr} of {key} is {value}.",
)
MULTI_STATEMENTS = (  # a key with several values of one attribute
    "One {attr} for {key} is {value}.",
    "Another {attr} of {key} is {value}.",
    "{key} also has the {attr} {value}.",
    "One of the {attrs} of {key} is {value}.",
)
Q_SINGLE = (
    "What is the {attr} for {key}?",
    "Which {attr} belongs to {key}?",
    "What {attr} was given to {key}?",
    "Tell me the {attr} of {key}.",
    "What is {key}'s {attr} according to the text?",
    "Find the {attr} for {key} in the text above.",
)
Q_ALL = (
    "What are all the {attrs} for {key}?",
    "List every {attr} given for {key}.",
    "Which {attrs} does {key} have?",
    "Name each {attr} that belongs to {key}.",
)
Q_KEYS = (
    "What are the {attrs} for {keys}?",
    "Give the {attr} of each of these: {keys}.",
    "Which {attrs} belong to {keys}?",
)
A_SINGLE = (
    "The {attr} for {key} is {value}.",
    "{key}'s {attr} is {value}.",
    "The {attr} of {key} is {value}.",
)
A_ALL = ("The {attrs} for {key} are {values}.", "{key} has the {attrs} {values}.")
QUESTION_KINDS = ("single", "multi_value", "multi_key")
VALUE_KINDS = ("number", "uuid", "words")


@dataclass(kw_only=True)
class SynthConfig:
    """How many and what kind of synthetic documents ``synth_documents`` makes."""

    share: float = 0.10  # synthetic share of the training stream (chars of synth / chars of book+synth)
    seed: int = 0
    min_passage_chars: int = 300
    max_passage_chars: int = 3000  # keep passages well inside the attention window (~4 chars/token)
    kinds: tuple[str, ...] = DEFAULT_KINDS
    weights: tuple[float, ...] | None = None  # relative frequency of each kind (None = uniform)
    # kv passages: lengths in tokens-equivalent (chars / chars_per_token); the fact may land anywhere
    kv_min_tokens: int = 100
    kv_max_tokens: int = 1800
    kv_sources_max_tokens: int = 250  # reader-layout kv docs stay inside the reader's prompt budget
    kv_sources_share: float = 0.4  # share of kv docs in the hybrid reader's numbered-sources layout
    kv_sentence_share: float = 0.6  # share of kv answers that restate the key before the value
    kv_attributes: str = "base"  # "base" = ATTRIBUTES; "wide" = ATTRIBUTES + WIDE_ATTRIBUTES
    chars_per_token: float = 3.5  # measured for the shipped 8192 BPE on the training books

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        if self.weights is not None:
            self.weights = tuple(self.weights)
            if len(self.weights) != len(self.kinds) or min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(
                    f"weights must be {len(self.kinds)} non-negative numbers, got {self.weights}"
                )
        if not 0 < self.min_passage_chars <= self.max_passage_chars:
            raise ValueError("need 0 < min_passage_chars <= max_passage_chars")
        if not 0 <= self.share < 1:
            raise ValueError(f"share must be in [0, 1), got {self.share}")
        if self.kv_attributes not in ATTRIBUTE_SETS:
            raise ValueError(
                f"kv_attributes must be one of {tuple(ATTRIBUTE_SETS)}, got {self.kv_attributes!r}"
            )
        if not 0 < self.kv_min_tokens <= min(self.kv_max_tokens, self.kv_sources_max_tokens):
            raise ValueError("need 0 < kv_min_tokens <= kv_max_tokens and <= kv_sources_max_tokens")


@dataclass(kw_only=True)
class KVExample:
    """One key-value lookup document. ``text`` = ``prompt`` + " " + ``answer`` (the encoder adds <|eos|>)."""

    prompt: str  # everything the model reads before answering; ends with "Answer:"
    answer: str  # the target after "Answer: "
    values: list[str]  # values the answer must contain (RULER string_match_all references), answer order
    keys: list[str]  # the queried key of each value
    attr: str  # the queried attribute (distractors may use another)
    facts: list[str]  # the queried fact sentences, as inserted (one per value)
    n_facts: int  # facts inserted, distractors included
    question_kind: str  # "single" | "multi_value" | "multi_key"
    value_kind: str  # "number" | "uuid" | "words"
    fmt: str  # "plain" (qa_prompt) | "sources" (hybrid reader layout)
    fact_offsets: list[int] = field(default_factory=list)  # char offset of each queried fact in ``prompt``

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def qa_prompt(context: str, question: str) -> str:
    """The trained question format; the model's answer follows (ends with <|eos|>)."""
    return f"{context}\n\n{QUESTION}{question}\n{ANSWER}"


def sources_prompt(chunks: list[str], question: str) -> str:
    """The hybrid reader's layout (hybrid/reader.py): header, ``[n] chunk`` lines, question, "Answer:"."""
    body = "".join(f"[{i}] {c}\n" for i, c in enumerate(chunks, start=1))
    return f"{SOURCES_HEADER}{body}{QUESTION}{question}\n{ANSWER}"


def is_clean(text: str) -> bool:
    """True when ``text`` contains none of the ``BANNED`` evaluation phrases (case-insensitive)."""
    low = text.lower()
    return not any(b in low for b in BANNED)


def book_vocabulary(book_text: str) -> list[str]:
    """Sorted lower-case content words (4-10 letters) of a book: the pool for keys and word values."""
    return sorted(set(_WORD_RE.findall(book_text)) - _STOP)


def synth_documents(book_text: str, book_id: str, cfg: SynthConfig | None = None) -> list[str]:
    """Synthetic docs from one book, about ``share / (1 - share)`` of its length; deterministic per book."""
    cfg = cfg or SynthConfig()
    paragraphs = [p for p in book_text.split("\n\n") if p.strip()]
    if cfg.share <= 0 or not paragraphs:
        return []
    rng = random.Random(f"{cfg.seed}:{book_id}")
    vocab = book_vocabulary(book_text) if "kv" in cfg.kinds else []
    target = cfg.share / (1.0 - cfg.share) * len(book_text)
    docs: list[str] = []
    total, misses = 0, 0
    while total < target and misses < 50:
        # passage, then kind, in this order: the default config gives the shipped models' stream bit for bit
        passage = _passage(paragraphs, rng, cfg.min_passage_chars, cfg.max_passage_chars)
        kind = rng.choice(cfg.kinds) if cfg.weights is None else rng.choices(cfg.kinds, cfg.weights)[0]
        doc = _kv_text(paragraphs, vocab, rng, cfg) if kind == "kv" else _make(kind, passage, rng)
        if doc is None or not is_clean(doc):
            misses += 1
            continue
        if total + len(doc) > target and rng.random() > (target - total) / len(doc):
            break  # stochastic rounding of the last doc keeps the expected share exact for short books
        docs.append(doc)
        total += len(doc)
    return docs


def make_document(
    kind: str, paragraphs: list[str], vocab: list[str], rng: random.Random, cfg: SynthConfig
) -> str | None:
    """One synthetic document of ``kind`` from a random passage of ``paragraphs`` (None = no usable passage)."""
    if kind == "kv":
        return _kv_text(paragraphs, vocab, rng, cfg)
    return _make(kind, _passage(paragraphs, rng, cfg.min_passage_chars, cfg.max_passage_chars), rng)


def _kv_text(paragraphs: list[str], vocab: list[str], rng: random.Random, cfg: SynthConfig) -> str | None:
    ex = kv_example(paragraphs, vocab, rng, cfg)
    return None if ex is None else ex.text


def _passage(paragraphs: list[str], rng: random.Random, min_chars: int, max_chars: int) -> list[str]:
    want = rng.randint(min_chars, max_chars)
    i = rng.randrange(len(paragraphs))
    out: list[str] = []
    n = 0
    while i < len(paragraphs) and n < want:
        p = paragraphs[i][: max_chars - n]
        out.append(p)
        n += len(p) + 2
        i += 1
    return out


def _sentences(passage: list[str], min_words: int) -> list[str]:
    sents = [s.strip() for p in passage for s in _SENT_RE.split(p.replace("\n", " "))]
    return [s for s in sents if len(s.split()) >= min_words]


def _make(kind: str, passage: list[str], rng: random.Random) -> str | None:
    context = "\n\n".join(passage)
    if kind == "continue":
        sents = _sentences(passage, 12)
        if not sents:
            return None
        words = rng.choice(sents).split()
        k = rng.randint(4, 7)
        quote, rest = " ".join(words[:k]), " ".join(words[k : k + rng.randint(5, 12)])
        return qa_prompt(context, f'In the text above, what words come right after "{quote}"?') + " " + rest
    if kind == "copy":
        sents = _sentences(passage, 5)
        if not sents:
            return None
        line = rng.choice(sents)[:300]
        return qa_prompt(context, f"Repeat this line exactly: {line}") + " " + line
    names = _NAME_RE.findall(context)
    if not names:
        return None
    name = rng.choice(names)
    n = str(rng.randint(10 ** (d := rng.randint(5, 9)) // 10, 10**d - 1))
    statement, question = rng.choice(_NUMBER_FACTS)
    at = rng.randint(0, len(passage))
    body = passage[:at] + [statement.format(name=name, n=n)] + passage[at:]
    return qa_prompt("\n\n".join(body), question.format(name=name)) + " " + n


# ---- kind "kv" ----------------------------------------------------------------------------------------
def kv_example(
    paragraphs: list[str],
    vocab: list[str],
    rng: random.Random,
    cfg: SynthConfig | None = None,
    *,
    fmt: str | None = None,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
) -> KVExample | None:
    """A key-value lookup document from a random passage of ``paragraphs`` (None when the passage is unusable).

    ``fmt`` / token bounds override the config's random choices (the held-out evaluation set uses them).
    """
    cfg = cfg or SynthConfig()
    fmt = fmt or ("sources" if rng.random() < cfg.kv_sources_share else "plain")
    hi = max_tokens or (cfg.kv_sources_max_tokens if fmt == "sources" else cfg.kv_max_tokens)
    lo = min(min_tokens or cfg.kv_min_tokens, hi)
    n_chars = int(rng.randint(lo, hi) * cfg.chars_per_token)
    text = "\n\n".join(_passage(paragraphs, rng, n_chars, n_chars)).strip()
    text = text[: text.rfind(" ")] if len(text) >= n_chars and " " in text else text  # no cut word at the end
    if len(text) < 0.5 * lo * cfg.chars_per_token:
        return None  # the book ended right after the passage start
    qkind = rng.choice(QUESTION_KINDS)
    n_queried = {"single": 1, "multi_value": rng.randint(2, 4), "multi_key": rng.randint(2, 3)}[qkind]
    n_facts = rng.randint(n_queried, 8)
    n_keys = n_facts - n_queried + (1 if qkind == "multi_value" else n_queried)
    keys = _keys(text, vocab, n_keys, rng)
    if keys is None:
        return None
    vkind = rng.choices(VALUE_KINDS, weights=(0.5, 0.25, 0.25))[0]
    attrs = ATTRIBUTE_SETS[cfg.kv_attributes]
    attr = rng.choice([a for a, kinds in attrs.items() if vkind in kinds])
    values = _values(vkind, n_facts, text, vocab, rng)
    if values is None:
        return None
    facts = _facts(qkind, keys, values, n_queried, attr, vkind, rng, attrs)
    sentences = [_statement(k, a, v, qkind == "multi_value" and q, rng) for k, a, v, q in facts]
    context, order = _insert(text, sentences, rng)
    queried = [i for i in order if facts[i][3]]  # queried facts in text order
    if qkind == "multi_key":  # ask about the keys in a random order; answer in the question's order
        rng.shuffle(queried)
    question, answer = _question_answer(
        qkind, attr, [facts[i][0] for i in queried], [facts[i][2] for i in queried], rng, cfg
    )
    if fmt == "sources":
        prompt = sources_prompt(_chunks(context, rng), question)
    else:
        prompt = qa_prompt(context, question)
    q_sents = [sentences[i] for i in queried]
    offsets = [prompt.find(s) for s in q_sents]
    assert min(offsets) >= 0, "a queried fact was split while building the prompt"
    return KVExample(
        prompt=prompt,
        answer=answer,
        values=[facts[i][2] for i in queried],
        facts=q_sents,
        keys=[facts[i][0] for i in queried],
        attr=attr,
        n_facts=n_facts,
        question_kind=qkind,
        value_kind=vkind,
        fmt=fmt,
        fact_offsets=offsets,
    )


def _facts(
    qkind: str,
    keys: list[str],
    values: list[str],
    n_queried: int,
    attr: str,
    vkind: str,
    rng: random.Random,
    attrs: dict[str, tuple[str, ...]],
) -> list[tuple[str, str, str, bool]]:
    """(key, attribute, value, queried) per fact: the queried ones first; distractors use the other keys."""
    q_keys = keys[:1] * n_queried if qkind == "multi_value" else keys[:n_queried]
    d_keys = keys[1:] if qkind == "multi_value" else keys[n_queried:]
    facts = [(k, attr, v, True) for k, v in zip(q_keys, values[:n_queried], strict=True)]
    for k, v in zip(d_keys, values[n_queried:], strict=True):
        same = rng.random() < 0.5  # a distractor of the same attribute half of the time
        d_attr = attr if same else rng.choice([a for a, ks in attrs.items() if vkind in ks])
        facts.append((k, d_attr, v, False))
    return facts


def _keys(text: str, vocab: list[str], n: int, rng: random.Random) -> list[str] | None:
    """``n`` distinct keys, none a substring of another: passage names, passage words, or word pairs."""
    names = sorted(set(_NAME_RE.findall(text)))
    words = sorted(set(_WORD_RE.findall(text)) - _STOP) or vocab
    if not words:
        return None
    style = rng.choice(("name", "word", "pair")) if names else rng.choice(("word", "pair"))
    keys: list[str] = []
    for _ in range(20 * n):
        if len(keys) == n:
            break
        if style == "name":
            k = rng.choice(names) if rng.random() < 0.7 or not vocab else rng.choice(vocab).capitalize()
        elif style == "word":
            k = rng.choice(words if rng.random() < 0.7 or not vocab else vocab)
        else:
            k = f"{rng.choice(words)}-{rng.choice(vocab or words)}"
        if all(k not in o and o not in k for o in keys):
            keys.append(k)
    return keys if len(keys) == n else None


def _values(kind: str, n: int, text: str, vocab: list[str], rng: random.Random) -> list[str] | None:
    """``n`` distinct values, none a substring of another or of the passage."""
    out: list[str] = []
    for _ in range(20 * n):
        if len(out) == n:
            break
        if kind == "number":
            d = 7 if rng.random() < 0.5 else rng.randint(5, 9)
            v = str(rng.randint(10 ** (d - 1), 10**d - 1))
        elif kind == "uuid":
            v = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        else:
            if len(vocab) < 10:
                return None
            v = rng.choice(("-", " ")).join(rng.choice(vocab) for _ in range(rng.randint(2, 3)))
        if v not in text and all(v not in o and o not in v for o in out):
            out.append(v)
    return out if len(out) == n else None


def _statement(key: str, attr: str, value: str, multi: bool, rng: random.Random) -> str:
    pool = MULTI_STATEMENTS + STATEMENTS if multi else STATEMENTS
    if not value.replace("-", "").isalnum() or not any(c.isdigit() for c in value):
        pool = tuple(t for t in pool if not t.startswith("{value}"))  # "<words> is the ..." reads ambiguously
    template = rng.choice(pool)
    s = template.format(key=key, attr=attr, attrs=attr + "s", value=value)
    return s if template.startswith("{value}") else s[0].upper() + s[1:]  # values stay verbatim


def _insert(text: str, sentences: list[str], rng: random.Random) -> tuple[str, list[int]]:
    """Insert ``sentences`` at random sentence/paragraph boundaries; return (text, fact indices in text order)."""
    ends = (m.start() for m in _BOUNDARY_RE.finditer(text))
    cuts = sorted({0, len(text), *(p for p in ends if not text[:p].endswith(_ABBREV))})
    at = [rng.choice(cuts) for _ in sentences]
    order = sorted(range(len(sentences)), key=lambda i: (at[i], rng.random()))
    parts, prev = [], 0
    for i in order:
        parts += [text[prev : at[i]], " " if at[i] > 0 else "", sentences[i], " " if at[i] == 0 else ""]
        prev = at[i]
    parts.append(text[prev:])
    return "".join(parts), order


def _chunks(context: str, rng: random.Random) -> list[str]:
    """Cut the passage into 40-130-word chunks at sentence boundaries, sometimes shuffled (retrieval rank)."""
    sents = [s for s in _SENT_RE.split(context.replace("\n\n", " ").replace("\n", " ")) if s.strip()]
    chunks, cur, n, want = [], [], 0, rng.randint(40, 130)
    for s in sents:
        cur.append(s.strip())
        n += len(s.split())
        if n >= want:
            chunks.append(" ".join(cur))
            cur, n, want = [], 0, rng.randint(40, 130)
    if cur:
        chunks.append(" ".join(cur))
    if rng.random() < 0.5:
        rng.shuffle(chunks)
    return chunks


def _join(values: list[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def _question_answer(
    qkind: str, attr: str, keys: list[str], values: list[str], rng: random.Random, cfg: SynthConfig
) -> tuple[str, str]:
    sentence = rng.random() < cfg.kv_sentence_share
    if qkind == "single":
        q = rng.choice(Q_SINGLE).format(attr=attr, key=keys[0])
        a = rng.choice(A_SINGLE).format(attr=attr, key=keys[0], value=values[0]) if sentence else values[0]
    elif qkind == "multi_value":
        q = rng.choice(Q_ALL).format(attr=attr, attrs=attr + "s", key=keys[0])
        vals = _join(values)
        a = rng.choice(A_ALL).format(attrs=attr + "s", key=keys[0], values=vals) if sentence else vals
    else:
        q = rng.choice(Q_KEYS).format(attr=attr, attrs=attr + "s", keys=_join(keys))
        if sentence:
            a = " ".join(f"The {attr} for {k} is {v}." for k, v in zip(keys, values, strict=True))
        else:
            a = ", ".join(values)
    return q[0].upper() + q[1:], a[0].upper() + a[1:] if sentence else a
