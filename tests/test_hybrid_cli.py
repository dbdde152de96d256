"""`ttt-rag ingest` / `ttt-rag ask` through Typer's runner (default random debug model, BM25-only store).

Run: .venv/bin/python -m pytest -q tests/test_hybrid_cli.py
"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli.main import app


def test_ingest_then_ask_cites_the_right_file(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "mill.txt").write_text("The vault under the old mill opens with the code 7731.")
    (docs / "garden.md").write_text("The walled garden grows pears and quinces every summer.")
    (docs / "harbour.txt").write_text("Ships leave the harbour at dusk, loaded with timber and salt.")
    (docs / "skip.bin").write_bytes(b"\x00\x01")
    store = tmp_path / "store"
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(docs), "--store", str(store), "--no-dense"])
    assert res.exit_code == 0, res.output
    assert "ingested 3 documents" in res.output
    res = runner.invoke(
        app,
        [
            "ask",
            "Which code opens the vault?",
            "--store",
            str(store),
            "--route",
            "lookup",
            "--max-tokens",
            "4",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{") :])
    assert out["route"] == "lookup" and out["sources"][0]["doc_id"] == "mill.txt"
    assert out["usage"]["completion_tokens"] <= 4
    res = runner.invoke(app, ["ask", "   ", "--store", str(store), "--route", "lookup"])
    assert res.exit_code != 0 and "empty" in res.output
    res = runner.invoke(app, ["ask", "hi?", "--store", str(tmp_path / "nothing")])
    assert res.exit_code != 0 and "ttt-rag ingest" in res.output
