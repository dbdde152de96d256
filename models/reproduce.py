"""Reference-model pipeline (issue 5) exactly as it ran on the GPU: tokenizer + shards, probe, training.

The commands used for the shipped checkpoints are in models/README.md.

    python3 .carry/gpu_ref.py prep  TAR WORK [--max-books N] [--vocab V]
    python3 .carry/gpu_ref.py train WORK MODE [--steps S] [--minutes M] [--preset P] [--seq L] [--batch B]
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ttt.data import DataConfig, build_shards, train_tokenizer
from ttt.train import TrainConfig, train

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
p = argparse.ArgumentParser()
p.add_argument("phase")
p.add_argument("a")
p.add_argument("b")
p.add_argument("--max-books", type=int, default=None)
p.add_argument("--vocab", type=int, default=8192)
p.add_argument("--steps", type=int, default=800)
p.add_argument("--minutes", type=float, default=9.0)
p.add_argument("--preset", default="ref")
p.add_argument("--seq", type=int, default=4096)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--overrides", default="{}")
p.add_argument("--eval-batches", type=int, default=4)
a = p.parse_args()
if a.phase == "prep":
    t = time.time()
    cfg = DataConfig(max_books=a.max_books)
    tok = train_tokenizer(a.a, vocab_size=a.vocab, cfg=cfg)
    logging.info("tokenizer %d in %.0fs", tok.vocab_size, time.time() - t)
    idx = build_shards(a.a, Path(a.b) / "data", tok, cfg)
    logging.info("shards %s in %.0fs", {s: v["tokens"] for s, v in idx["splits"].items()}, time.time() - t)
elif a.phase == "probe":  # tokens/s of the e2e meta-training step at this shape -> steps for a time budget
    import torch

    from ttt import ModelConfig, TTTModel

    cfg = ModelConfig.from_name(a.preset)
    m = TTTModel(cfg).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), device="cuda")
    for i in range(5):
        if i == 2:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m.meta_loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 3
    steps = int(float(a.b) * 60 / dt)
    logging.info("e2e step %.3fs (%.0f tok/s) -> %d steps in %s min", dt, a.batch * a.seq / dt, steps, a.b)
    print(steps)
else:
    work = Path(a.a)
    cfg = TrainConfig(
        data_dir=str(work / "data"),
        model=a.preset,
        mode=a.b,
        seq_len=a.seq,
        batch_size=a.batch,
        steps=a.steps,
        lr=a.lr,
        max_minutes=a.minutes,
        ckpt_every=100,
        eval_every=100,
        eval_batches=a.eval_batches,
        log_every=10,
        progress=False,
        model_overrides=json.loads(a.overrides),
    )
    r = train(cfg, work / f"run-{a.b}")
    logging.info("RESULT %s", r)
