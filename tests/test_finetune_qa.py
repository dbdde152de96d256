"""QA fine-tune pipeline (issue 8): the packed stream builder and models/finetune_qa.py end to end on CPU.

Run: .venv/bin/python -m pytest -q tests/test_finetune_qa.py
A tiny fake corpus (tests/test_data.make_corpus), the byte-level tokenizer and ``debug`` models stand in
for the real corpus and the shipped models; the GPU run uses the same code with the real ones.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import make_corpus

from ttt import ModelConfig, TTTModel
from ttt.data import (
    QA_EVAL_FILE,
    QADataConfig,
    SequenceLoader,
    TokenStream,
    build_qa_stream,
    compress_shards,
    decompress_shards,
    iter_books,
    list_book_ids,
    load_index,
    split_books,
)
from ttt.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SEQ = 2048


def _load_script():
    spec = importlib.util.spec_from_file_location("finetune_qa", REPO / "models" / "finetune_qa.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ft = _load_script()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qa")
    tar, bodies = make_corpus(tmp, n_books=12, paragraphs=12)
    tok = Tokenizer.byte_level()
    cfg = QADataConfig(
        train_tokens=16 * SEQ,
        seq_len=SEQ,
        min_val_books=2,
        eval_questions=4,
        val_tokens=4000,
        reader_prompt_tokens=4000,
    )
    index = build_qa_stream(tar, tmp / "data", tok, cfg)
    return tmp, tar, bodies, tok, index


def test_stream_holds_out_val_books_and_keeps_documents_whole(built) -> None:
    tmp, tar, bodies, tok, index = built
    split = split_books(list_book_ids(tar), 0.025, 2)  # the split of ttt.data.build_shards
    val_ids = {b for b, s in split.items() if s == "val"}
    assert {b["id"] for b in index["books"] if b["split"] == "val"} == val_ids
    train = TokenStream(tmp / "data", "train").slice(0, index["splits"]["train"]["tokens"])
    assert len(train) == 16 * SEQ
    text = tok.decode(train.tolist())
    for b in val_ids:  # no 60-character piece of a held-out book anywhere in the training stream
        body = bodies[b]
        assert not any(body[i : i + 60] in text for i in range(0, len(body) - 60, 97)), b
    share = index["splits"]["train"]["synth_tokens"] / index["splits"]["train"]["tokens"]
    assert 0.4 < share < 0.6, f"synthetic share {share}"
    docs = 0
    for r, row in enumerate(train.reshape(-1, SEQ)):  # every <|bos|> doc <|eos|> lies inside one row
        bos, eos = np.flatnonzero(row == tok.bos_id), np.flatnonzero(row == tok.eos_id)
        assert len(bos) == len(eos), f"row {r}: {len(bos)} bos vs {len(eos)} eos"
        assert (bos < eos).all() and (eos[:-1] < bos[1:]).all(), f"row {r}: a document straddles a row"
        docs += len(bos)
    assert docs > 16, "synthetic documents in most rows"
    val = TokenStream(tmp / "data", "val").slice(0, 4000)
    first_val = next(b for b in iter_books(tar) if b.id in val_ids)
    assert tok.decode(val[1:200].tolist()) == first_val.text.encode()[:199].decode("utf-8", "ignore")


def test_eval_questions_come_from_held_out_books(built) -> None:
    tmp, tar, bodies, tok, index = built
    items = [json.loads(x) for x in (tmp / "data" / QA_EVAL_FILE).read_text().splitlines()]
    assert len(items) == 4 and {i["fmt"] for i in items} == {"sources", "plain"}
    val_ids = {b["id"] for b in index["books"] if b["split"] == "val"}
    for it in items:
        assert it["book"] in val_ids
        assert all(v in it["prompt"] and v in it["answer"] for v in it["values"])
        raw = it["prompt"].encode()  # byte-level tokens = bytes: an independent token count
        assert it["prompt_tokens"] == len(raw) + 1
        first = min(len(it["prompt"][: it["prompt"].find(f)].encode()) for f in it["facts"])
        assert it["fact_distance"] == len(raw) - first


def test_compress_round_trip(built, tmp_path) -> None:
    tmp, *_ = built
    shutil.copytree(tmp / "data", tmp_path / "c")
    plain = sum(f.stat().st_size for f in (tmp / "data").iterdir())
    packed = compress_shards(tmp_path / "c")
    assert packed < plain and not list((tmp_path / "c").glob("*.npy"))
    out = decompress_shards(tmp_path / "c", tmp_path / "d")
    for s in ("train", "val"):
        a, b = TokenStream(tmp / "data", s), TokenStream(out, s)
        assert np.array_equal(a.slice(0, len(a)), b.slice(0, len(b)))


def test_match_share_equals_ruler_string_match_all() -> None:
    from eval.niah.scoring import string_match_all

    preds = ["The code for Ann is 1234567.", "1234567 and 7654321", "nothing", "ABC-def and x"]
    refs = [["1234567"], ["7654321", "1234567", "999"], ["1"], ["abc-DEF"]]
    ours = sum(ft.match_share(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds) * 100
    assert round(ours, 2) == string_match_all(preds, refs)
    rows = [
        {"share": s, "fmt": f, "window": "inside", "value_kind": "number", "question_kind": "single"}
        for s, f in ((1.0, "plain"), (0.5, "plain"), (1.0, "sources"))
    ]
    summ = ft.summarize(rows)
    assert summ["all"]["exact"] == pytest.approx(2 / 3) and summ["fmt=plain"]["string_match_all"] == 0.75


def _model_dir(path: Path, tok: Tokenizer, fa: bool) -> Path:
    torch.manual_seed(0)
    over = {"window": None, "n_ttt_layers": 0} if fa else {}
    TTTModel(ModelConfig.from_name("debug", bos_id=tok.bos_id, **over)).save_pretrained(path, tokenizer=tok)
    return path


def _short_items(data: Path, n: int = 2) -> None:
    """Replace the eval set by short questions (the debug model reads byte tokens slowly)."""
    rng, rows = random.Random(0), []
    for i in range(n):
        v = str(rng.randint(10**6, 10**7 - 1))
        prompt = (
            f"The door code for Ann is {v}. It rained.\n\nQuestion: What is the door code for Ann?\nAnswer:"
        )
        rows.append(
            {
                "prompt": prompt,
                "answer": v,
                "values": [v],
                "fmt": ("plain", "sources")[i % 2],
                "question_kind": "single",
                "value_kind": "number",
                "answer_tokens": 8,
                "fact_distance": len(prompt) - 0,
            }
        )
    (data / QA_EVAL_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_finetune_e2e_runs_exports_and_reports(built, tmp_path) -> None:
    tmp, _, _, tok, _ = built
    model = _model_dir(tmp_path / "m", tok, fa=False)
    shutil.copytree(tmp / "data", tmp_path / "data")
    compress_shards(tmp_path / "data")  # the carried form
    _short_items(tmp_path / "data")
    res = ft.main(
        [
            "run",
            str(model),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "out"),
            "--mode",
            "e2e",
            "--seq",
            "64",
            "--batch",
            "2",
            "--steps",
            "0",
            "--minutes",
            "0.15",
            "--eval-n",
            "2",
            "--eval-batches",
            "1",
            "--device",
            "cpu",
            "--work",
            str(tmp_path / "w"),
            "--results",
            str(tmp_path / "r.json"),
        ]
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert 1 <= saved["train"]["step"] <= saved["probe"]["steps"], "steps probed to fit --minutes"
    assert (
        saved["train_config"]["steps"] == saved["probe"]["steps"]
        and saved["device"] == "cpu"
        and saved["git_sha"]
    )
    for when in ("before", "after"):
        assert saved[when]["qa"]["all"]["n"] == 2 and 0 <= saved[when]["qa"]["all"]["exact"] <= 1
    # val loss before = an independent float64 mean of the shipped model's TTT prefill NLL on the same batches
    m0 = TTTModel.from_pretrained(model, dtype=torch.float32)
    x = SequenceLoader(tmp_path / "w" / "data", "val", 64, 2, shuffle=False).next_batch()  # (2, 65)
    nll = m0.prefill(x).token_nll[:, 1:].double()
    keep = x[:, 1:] != tok.bos_id
    assert res["before"]["val"]["loss"] == pytest.approx(float(nll[keep].mean()), rel=1e-5)
    # the export is the trained checkpoint in bf16, and training moved the weights
    out = TTTModel.from_pretrained(tmp_path / "out")
    ck = torch.load(tmp_path / "w" / "run" / "ckpt.pt", weights_only=False)["model"]
    sd = out.state_dict()
    assert all(torch.equal(sd[k], ck[k].to(torch.bfloat16)) for k in ck)
    assert any(not torch.equal(sd[k], v.to(torch.bfloat16)) for k, v in m0.state_dict().items())
    assert (
        load_index(tmp_path / "w" / "data")["tokenizer_sha256"]
        == Tokenizer.from_pretrained(tmp_path / "out").sha256()
    )


def test_eval_fa_matches_float64_cross_entropy_and_rejects_other_tokenizers(built, tmp_path) -> None:
    tmp, _, _, tok, _ = built
    model = _model_dir(tmp_path / "fa", tok, fa=True)
    shutil.copytree(tmp / "data", tmp_path / "data")
    _short_items(tmp_path / "data")
    res = ft.main(
        [
            "eval",
            str(model),
            "--data",
            str(tmp_path / "data"),
            "--seq",
            "64",
            "--batch",
            "2",
            "--eval-n",
            "2",
            "--eval-batches",
            "1",
            "--device",
            "cpu",
            "--results",
            str(tmp_path / "e.json"),
        ]
    )
    m = TTTModel.from_pretrained(model, dtype=torch.float64)
    x = SequenceLoader(tmp_path / "data", "val", 64, 2, shuffle=False).next_batch()
    with torch.no_grad():
        logits = m(x[:, :-1])  # (2, 64, V)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    keep = x[:, 1:].flatten() != tok.bos_id
    assert res["model"]["val"]["loss"] == pytest.approx(float(ce[keep].mean()), rel=1e-5)
    assert res["model"]["qa"]["window=inside"]["n"] == 2, "full attention: every fact is inside"
    other = Tokenizer.train(["some other text to train a tokenizer on"] * 20, vocab_size=300)
    other.save(tmp_path / "fa" / "tokenizer.json")
    with pytest.raises(ValueError, match="another tokenizer"):
        ft.main(
            [
                "eval",
                str(model),
                "--data",
                str(tmp_path / "data"),
                "--device",
                "cpu",
                "--results",
                str(tmp_path / "x.json"),
            ]
        )


def test_pack_round_trip_and_eval_budget(built, tmp_path) -> None:
    """--pack: the export as tar parts no larger than the limit, which restore byte-identical files;
    --eval-budget-s 0 answers no question and says it stopped on the budget (a time-boxed GPU call)."""
    import subprocess

    tmp, _, _, tok, _ = built
    model = _model_dir(tmp_path / "m", tok, fa=False)
    names = ft.pack_dir(model, tmp_path / "parts", part_bytes=50_000)
    sizes = [(tmp_path / "parts" / n).stat().st_size for n in names]
    assert len(names) >= 2 and max(sizes) <= 50_000 and names == sorted(names)
    (tmp_path / "back").mkdir()
    cat = subprocess.run(
        ["cat", *[str(tmp_path / "parts" / n) for n in names]], capture_output=True, check=True
    )
    subprocess.run(["tar", "xf", "-", "-C", str(tmp_path / "back")], input=cat.stdout, check=True)
    for f in model.iterdir():
        assert (tmp_path / "back" / f.name).read_bytes() == f.read_bytes()
    m = TTTModel.from_pretrained(model, dtype=torch.float32)
    items = ft.load_items(tmp / "data", 2)
    none = ft.qa_eval(m, tok, items, torch.device("cpu"), budget_s=0.0)
    assert none["all"]["n"] == 0 and none["stopped_by_budget"]
    some = ft.qa_eval(m, tok, items[:1], torch.device("cpu"), budget_s=None)
    assert some["all"]["n"] == 1 and not some["stopped_by_budget"]
