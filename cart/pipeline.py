"""`cart pipeline`: every stage in order on one config, as `make demo` runs it."""

from __future__ import annotations

from pathlib import Path

from cart import build_ids, corpus, embed
from cart.config import Config


def run(cfg: Config) -> Path:
    outputs = [corpus.run(cfg), embed.run(cfg), build_ids.run(cfg)]
    print("outputs:")
    for path in outputs:
        print(f"  {path}")
    return cfg.run_dir
