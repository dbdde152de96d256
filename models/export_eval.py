"""Export finished runs and evaluate loss vs context: export_eval.py WORK OUT MODE [MODE...] [--eval]"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ttt.train import export

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
work, out = Path(sys.argv[1]), Path(sys.argv[2])
modes = [m for m in sys.argv[3:] if not m.startswith("--")]
for m in modes:
    export(work / f"run-{m}", work / f"exp-{m}")
if "--eval" in sys.argv:
    from eval.loss_vs_context import LossVsContextConfig, evaluate_models

    cfg = LossVsContextConfig(
        models={m: str(work / f"exp-{m}") for m in ("e2e", "fa", "swa")},
        data_dir=str(work / "data"),
        n_seqs=32,
        batch_size=8,
        name="loss_vs_context_ref",
        out_dir=str(out),
    )
    res = evaluate_models(cfg)
    print(json.dumps(res.get("summary", res.get("mean_loss", "")), default=str)[:3000])
