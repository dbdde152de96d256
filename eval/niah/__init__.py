"""NIAH eval harness: RULER's 8 NIAH tasks, gkamradt's depth x length grid, a low-lexical-overlap variant and
custom needles, run over every system (ttt, swa, full, retrieval, bm25, dense, regex, hybrid, fused).

Entry point: ``ttt-rag eval niah`` (``cli/eval_niah.py``) -> ``eval.niah.runner.run(RunConfig)``.
Importing this package is cheap; torch, retrieval and matplotlib load inside the functions that need them.
"""
