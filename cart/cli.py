"""The `cart` command: one subcommand per stage, each `--config FILE` plus `key=value` overrides.

This is the only place that sets seeds, logging and precision. Errors meant for
the user (CartError) print as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import time

from cart.errors import CartError

# subcommand -> (module with run(cfg) -> Path, what it does)
STAGES = {
    "corpus": ("cart.corpus", "read a dataset source, check it, write corpus.jsonl"),
    "embed": ("cart.embed", "embed every corpus item, write embeddings.safetensors"),
    "ids": ("cart.build_ids", "turn embeddings into unique semantic identifiers and their prefix trie"),
    "caption": ("cart.caption", "generate captions of the corpus images as extra training texts"),
    "train": ("cart.train", "train the CART model: query text -> identifier (accelerate launch -m cart train ...)"),
    "pipeline": ("cart.pipeline", "run every stage in order (the demo)"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cart", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", help="a YAML config (default: built-in defaults)")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. embed.batch_size=16")
        if name == "corpus":
            sub.add_argument("--on-bad", choices=("stop", "skip"), help="stop at the first bad item (default) or skip bad items")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if getattr(args, "on_bad", None):
        overrides.append(f"corpus.on_bad={args.on_bad}")
    try:
        from cart.config import load_config

        cfg = load_config(args.config, overrides)
        _seed(cfg.seed)
        module = importlib.import_module(STAGES[args.command][0])
        start = time.perf_counter()
        module.run(cfg)
        if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, the first process reports
            print(f"cart {args.command}: done in {time.perf_counter() - start:.1f} s")
    except CartError as e:
        print(f"cart {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"cart {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
