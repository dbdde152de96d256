"""NIAH harness: RULER scoring parity, exact templates, needle depth, length fitting, determinism, baselines."""

from __future__ import annotations

import json
import random
import re
import zlib

import pytest
from conftest import shared_path

from eval.niah.dataset import build_sample, iter_samples
from eval.niah.haystack import boundary_for_depth, essay_corpus, fit_units, noise_corpus, split_sentences
from eval.niah.scoring import postprocess_pred, string_match_all, string_match_part
from eval.niah.tasks import (
    LOWLEX_ADJ,
    LOWLEX_NOUN,
    TASKS,
    _wordlists,
    dataset_hash,
    load_needles,
    ruler_render,
)


# ---- RULER's metric code, verbatim (scripts/eval/synthetic/constants.py), as the independent reference ----
def ruler_string_match_part(preds, refs):
    score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) for pred, ref in zip(preds, refs)]) / len(preds) * 100  # fmt: skip  # noqa: E501, B905 (verbatim RULER)
    return round(score, 2)


def ruler_string_match_all(preds, refs):
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref) for pred, ref in zip(preds, refs)]) / len(preds) * 100  # fmt: skip  # noqa: E501, B905 (verbatim RULER)
    return round(score, 2)


class ByteTok:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class WordTok:
    """Word/punctuation tokenizer (ids by crc32): a second, BPE-like granularity for length tests."""

    def encode(self, text: str) -> list[int]:
        return [zlib.crc32(w.encode()) % 50_000 for w in re.findall(r"\w+|[^\w\s]", text)]


@pytest.fixture(scope="module")
def synth_essays(tmp_path_factory):
    """A synthetic essay directory (random dictionary sentences), so tests run without ../shared."""
    adj, noun = _wordlists()
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("essays")
    for f in range(3):
        sents = []
        for _ in range(400):
            words = [rng.choice(adj if i % 2 else noun) for i in range(rng.randint(4, 22))]
            sents.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
        (d / f"essay{f}.txt").write_text(" ".join(sents) + "\n\n")
    return d


# ---- scoring -------------------------------------------------------------------------------------------------
CASES = [
    (["The special magic number is 4829137."], [["4829137"]]),
    (["none here", "8812345 and 1234567", "1234567"], [["4829137"], ["1234567", "8812345"], ["8812345", "1234567"]]),
    (["UUID: 9D00D084-076D-48C3-B356-45BD9E24E977"], [["9d00d084-076d-48c3-b356-45bd9e24e977"]]),
    (["a, b", "", "xyz"], [["A", "B", "C"], ["x"], ["y", "z", "w"]]),
]  # fmt: skip


@pytest.mark.parametrize("preds,refs", CASES)
def test_scoring_matches_ruler(preds, refs):
    assert string_match_all(preds, refs) == ruler_string_match_all(preds, refs)
    assert string_match_part(preds, refs) == ruler_string_match_part(preds, refs)


def test_scoring_hand_values():
    preds, refs = ["a, b", "", "xyz"], [["A", "B", "C"], ["x"], ["y", "z", "w"]]
    assert string_match_all(preds, refs) == round((2 / 3 + 0 + 2 / 3) / 3 * 100, 2) == 44.44
    assert string_match_part(preds, refs) == round(2 / 3 * 100, 2)
    assert postprocess_pred("  12\t34\x00 ") == "12\n34\n"  # strip first, then control chars


def test_scoring_rejects_bad_input():
    with pytest.raises(ValueError, match="reference lists"):
        string_match_all(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="non-empty list"):
        string_match_all(["a"], ["a"])
    with pytest.raises(ValueError, match="empty prediction list"):
        string_match_part([], [])


# ---- templates -------------------------------------------------------------------------------------------------
def test_ruler_single_template_exact():
    inp, prefix = ruler_render(TASKS["s-niah-2"], "<CONTEXT>", "quizzical-ATM")
    assert inp + prefix == (
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the number afterwards.\n<CONTEXT>\nWhat is the special magic number for quizzical-ATM mentioned in "
        "the provided text? The special magic number for quizzical-ATM mentioned in the provided text is"
    )
    assert prefix == " The special magic number for quizzical-ATM mentioned in the provided text is"


def test_ruler_plural_template_exact():
    inp, prefix = ruler_render(TASKS["mq-niah"], "C", "a, b, and c")
    assert inp.startswith("Some special magic numbers are hidden within the following text.")
    assert inp.endswith(
        "\nWhat are all the special magic numbers for a, b, and c mentioned in the provided text?"
    )
    assert prefix == " The special magic numbers for a, b, and c mentioned in the provided text are"


def test_chat_templates_wrap_ruler_input_before_the_answer_prefix():
    """RULER's practice (niah.md 1.1): the task input, the model's assistant turn, then the answer prefix; "base"
    is RULER's own prompt unchanged, "reader" adds our reader fine-tune's turn marker."""
    from eval.niah.systems import SystemsConfig, wrap_prompt

    inp, prefix = ruler_render(TASKS["s-niah-1"], "<CONTEXT>", "k")
    assert wrap_prompt(inp, prefix, "base") == inp + prefix
    reader = wrap_prompt(inp, prefix, "reader")
    assert reader == inp + "\nAnswer:" + prefix
    assert inp.endswith("mentioned in the provided text?") and reader.index("\nAnswer:") == len(inp)
    with pytest.raises(ValueError, match="unknown chat template"):
        SystemsConfig(chat_template="llama3")


def test_ruler_needles_and_values_formats(synth_essays):
    s = build_sample(TASKS["mk-niah-3"], tokenizer=ByteTok(), target_length=3000, depth=30, index=0, seed=1)
    uuid_re = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(rf"One of the special magic uuids for {uuid_re} is: {uuid_re}\.", s.needles[0])
    assert s.outputs[0] in s.needles[0] and s.prompt.count(s.outputs[0]) == 1
    mv = build_sample(TASKS["mv-niah"], tokenizer=ByteTok(), target_length=3000, depth=30, index=0, seed=1,
                      corpus=essay_corpus(synth_essays))  # fmt: skip
    assert len(mv.outputs) == 4 and all(re.fullmatch(r"\d{7}", v) for v in mv.outputs)
    assert all(mv.context.count(v) == 1 for v in mv.outputs)


@pytest.mark.parametrize(("task", "n_needles"), [("lowlex-niah", 1), ("lowlex-mk-niah", 4)])
def test_lowlex_question_shares_no_content_word(synth_essays, task, n_needles):
    stop = {"the", "of", "is", "for", "a"}
    for i in range(20):
        s = build_sample(TASKS[task], tokenizer=ByteTok(), target_length=2000, depth=50, index=i, seed=3,
                         corpus=essay_corpus(synth_essays))  # fmt: skip
        q = set(re.findall(r"[a-z]+", s.question.lower())) - stop
        n = set(re.findall(r"[a-z]+", s.needles[0].lower())) - stop
        assert not q & n, (s.question, s.needles[0])
        planted = re.findall(r"The vault code for the [a-z]+ [a-z]+ is (\d{7})\.", s.context)  # all needles
        assert len(planted) == len(set(planted)) == n_needles and s.outputs[0] in planted, planted
        assert s.needles[0] in s.context and s.outputs == re.findall(r"\d{7}", s.needles[0])
    synonyms = [w for pair in LOWLEX_ADJ + LOWLEX_NOUN for w in pair]
    assert len(synonyms) == len(set(synonyms)), "a synonym appears in two pairs"


# ---- haystack: depth, length, determinism ------------------------------------------------------------------
def test_split_sentences_and_boundary():
    assert split_sentences('One. "Two!" Three? four') == ["One.", '"Two!"', "Three?", "four"]
    assert boundary_for_depth([10, 10, 10, 10], 0) == 0
    assert boundary_for_depth([10, 10, 10, 10], 49) == 1  # walk back to the sentence end at token 10
    assert boundary_for_depth([10, 10, 10, 10], 50) == 2
    assert boundary_for_depth([10, 10, 10, 10], 100) == 4
    assert fit_units(lambda n: 3 * n + 5, 100) == 31
    assert fit_units(lambda n: 3 * n + 5, 100, guess=30) == 31
    with pytest.raises(ValueError, match="too short"):
        fit_units(lambda n: n + 50, 10)


@pytest.mark.parametrize("tok", [ByteTok(), WordTok()], ids=["bytes", "words"])
@pytest.mark.parametrize("task", ["s-niah-1", "s-niah-2", "gk-niah", "mk-niah-1"])
def test_needle_lands_at_requested_depth(task, tok, synth_essays):
    corpus = noise_corpus() if TASKS[task].haystack == "noise" else essay_corpus(synth_essays)
    for depth in (0, 10, 33, 50, 75, 100):
        s = build_sample(
            TASKS[task], tokenizer=tok, target_length=4000, depth=depth, index=0, seed=5, corpus=corpus
        )
        seg_max = max(len(tok.encode(x)) for x in corpus.segments(corpus.pieces(s.n_units)))
        # other needles placed before the target shift it by at most their own length
        slack = (
            sum(len(tok.encode(x)) + 1 for x in s.context.split("\n") if "special magic" in x)
            if task == "mk-niah-1"
            else 0
        )  # noqa: E501
        target = depth / 100 * (s.context_n_tokens - len(tok.encode(s.needles[0])))  # the haystack alone
        got = s.needle_token_pos - s.context_token_start
        assert s.prompt[s.extra["needle_char_offsets"][0] :].startswith(s.needles[0])
        assert -slack - 2 <= target - got <= seg_max + slack + 2, (task, depth, target, got, seg_max)


@pytest.mark.parametrize("tok", [ByteTok(), WordTok()], ids=["bytes", "words"])
@pytest.mark.parametrize(
    "task,length", [("s-niah-1", 2048), ("s-niah-3", 2048), ("mq-niah", 8192), ("mk-niah-2", 8192)]
)
def test_length_within_one_percent(task, length, tok, synth_essays):
    corpus = {"noise": noise_corpus(), "essay": essay_corpus(synth_essays)}.get(TASKS[task].haystack)
    for i, depth in enumerate((0, 40, 100)):
        s = build_sample(
            TASKS[task], tokenizer=tok, target_length=length, depth=depth, index=i, seed=7, corpus=corpus
        )
        assert s.n_tokens == len(tok.encode(s.prompt))
        assert s.n_tokens <= length and (length - s.n_tokens) / length <= 0.01, (task, s.n_tokens, length)


def test_same_seed_same_dataset_hash(synth_essays):
    def data(seed: int) -> str:
        return dataset_hash(list(iter_samples(
            [TASKS["s-niah-1"], TASKS["s-niah-2"], TASKS["mk-niah-2"]], lengths=[600, 1200], depths=[0, 50],
            n_samples=2, seed=seed, tokenizer=ByteTok(), corpora={"noise": noise_corpus(), "essay": essay_corpus(synth_essays)},
        )))  # fmt: skip

    assert data(11) == data(11)
    assert data(11) != data(12)


def test_real_essays_have_no_value_patterns_and_fit():
    corpus = essay_corpus(shared_path("data", "haystack", "pg_essays"))
    assert not re.search(r"\b\d{7}\b", corpus.text)
    s = build_sample(
        TASKS["s-niah-2"], tokenizer=WordTok(), target_length=16000, depth=60, index=0, seed=42, corpus=corpus
    )
    assert 0.99 * 16000 <= s.n_tokens <= 16000
    assert abs(s.needle_depth - 60) < 1.0


# ---- inputs --------------------------------------------------------------------------------------------------
def test_load_needles(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text(
        json.dumps({"needle": "The key is under the mat.", "question": "Where is the key?", "answer": "mat"})
        + "\n\n"
    )
    (n,) = load_needles(p)
    assert n.answer == ["mat"]
    p.write_text('{"needle": "x", "question": "y"}\n')
    with pytest.raises(ValueError, match="missing \\['answer'\\]"):
        load_needles(p)
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=":1: not valid JSON"):
        load_needles(p)


def test_custom_needle_sample(tmp_path, synth_essays):
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps({"needle": "Zorblat keeps the spare key in a teapot.", "question": "Where is the spare key?",
                             "answer": ["teapot"]}) + "\n")  # fmt: skip
    s = build_sample(TASKS["custom"], tokenizer=ByteTok(), target_length=1500, depth=25, index=0, seed=0,
                     corpus=essay_corpus(synth_essays), custom=load_needles(p))  # fmt: skip
    assert s.outputs == ["teapot"] and s.question == "Where is the spare key?"
    assert s.prompt.endswith("Question: Where is the spare key?\nAnswer:")


def test_essay_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        essay_corpus(tmp_path / "nope")
    with pytest.raises(ValueError, match="no .txt files"):
        essay_corpus(tmp_path)
