"""Train the shipped router on the train split of router/data/router_examples.jsonl.

    python -m router.train_default            # writes router/data/router.{safetensors,json}
    python -m router.train_default --out DIR  # somewhere else

Deterministic: full-batch L-BFGS in float64, fixed fold seed. Takes ~30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from router.router import DEFAULT_DIR, Router, RouterConfig, load_examples

log = logging.getLogger(__name__)


def train_default(out_dir: Path = DEFAULT_DIR, data: Path | None = None, seed: int = 0) -> Router:
    cfg = RouterConfig()
    cfg.classifier.seed = seed
    router = Router(config=cfg)
    report = router.fit(load_examples(data, split="train"))
    router.save(out_dir)
    log.info("saved router to %s: %s", out_dir, report)
    return router


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_DIR, help="directory for router.safetensors/router.json"
    )
    ap.add_argument("--data", type=Path, default=None, help="labelled JSONL (default: the shipped set)")
    ap.add_argument("--seed", type=int, default=0, help="cross-validation fold seed")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train_default(args.out, args.data, args.seed)


if __name__ == "__main__":
    main()
