"""`cart pipeline`: every stage in order on one config, as `make demo` runs it."""

from __future__ import annotations

from pathlib import Path

import json

from cart import build_ids, corpus, embed, files, train
from cart.config import Config


def run(cfg: Config) -> Path:
    outputs = [corpus.run(cfg), embed.run(cfg), build_ids.run(cfg), train.run(cfg)]
    print("outputs:")
    for path in outputs:
        print(f"  {path}")
    history = json.loads((cfg.run_dir / files.TRAIN_LOG).read_text(encoding="utf-8"))["history"]
    print("validation R@1 by epoch (training texts held out of training; the held-out query sets are not used):")
    for row in history:
        print(f"  epoch {row['epoch']:>2}  step {row['step']:>5}  validation R@1 {row['validation_r1']:.3f}"
              f"  training-query R@1 {row['train_r1']:.3f}")
    return cfg.run_dir
