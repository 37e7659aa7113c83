"""Benchmark `cart train` on the emoji config: training throughput (query-identifier pairs per second) of
the default and of the variants that change a step's cost (the encoder cached or run, fine fusion, R-Drop,
the previous default), measured in one run, and how long a full training takes. Prints JSON.

Needs the demo's inputs (`make demo`, or `cart pipeline --config configs/emoji.yaml` up to ids).

    .venv/bin/python scripts/bench_train.py [--steps 30] [--full]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> overrides of the emoji default
    "default (frozen encoder's layers cached)": [],
    "default, the encoder run every step": ["train.cache_encoder=false"],
    "with coarse + fine fusion (the paper)": ["model.fusion=true"],
    "coarse fusion only": ["model.fusion=true", "model.fine_fusion=false"],
    "with R-Drop": ["train.rdrop_weight=1.0"],
    "with the ranking loss (4 negatives)": ["train.rank_weight=1.0", "train.rank_negatives=4"],
    "issue 7's default (batch 64, R-Drop, no level softmax, no cache)": [
        "train.batch_size=64", "train.rdrop_weight=1.0", "model.level_softmax=false", "train.cache_encoder=false",
        "model.fusion=true"],
}


def throughput(cfg, steps: int) -> dict:
    """Pairs per second over `steps` optimiser steps after 3 warm-up steps, forward + backward + update."""
    from cart.data import corpus, pairs
    from cart.index import build_ids
    from cart.model import batches, model_io
    from cart.model.losses import cart_loss
    from cart.retrieve.rerank import item_embeddings

    records = corpus.read(cfg.run_dir)
    ids = build_ids.load(cfg.run_dir)
    splits = pairs.split_pairs(records, cfg)
    train_pairs = splits.train
    tokenizer = model_io.load_tokenizer(cfg)
    torch.manual_seed(cfg.seed)
    model = model_io.build_model(cfg, ids.layout.level_sizes, len(tokenizer)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.learning_rate)
    labels = batches.identifier_labels(ids.tokens)
    max_tokens = cfg.model.max_query_tokens
    cache = None
    if cfg.train.cache_encoder and getattr(model.encoder, "frozen", False):  # as `cart train` does
        cache = batches.LayerCache(model.encoder, tokenizer, train_pairs.texts, max_tokens, torch.device("cpu"))
    grouped = batches.LengthGroupedBatches(batches.token_lengths(train_pairs.texts, tokenizer, max_tokens),
                                           cfg.train.batch_size, cfg.seed)
    negatives = batches.HardNegatives(item_embeddings(cfg.run_dir), train_pairs, splits.relevant, cfg.train.rank_negatives) \
        if cfg.train.rank_weight > 0 else None
    first_batches = [batches.make_batch(rows, train_pairs, labels, tokenizer, max_tokens, cache, negatives)  # training's first batches
                     for rows, _ in zip(grouped, range(steps + 3))]
    for i, batch in enumerate(first_batches):
        if i == 3:
            start = time.perf_counter()
        loss = cart_loss(model, batch, cfg.train.rdrop_weight, cfg.train.rank_weight)
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    return {"pairs_per_second": round(steps * cfg.train.batch_size / seconds, 1), "seconds_per_step": round(seconds / steps, 3),
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def main() -> None:
    from cart.config import load_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs/emoji.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--full", action="store_true", help="also train to early stopping (the demo's training)")
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "throughput": {}}
    for name, overrides in VARIANTS.items():
        cfg = load_config(args.config, overrides)
        results["throughput"][name] = throughput(cfg, args.steps)
        print(f"{name}: {results['throughput'][name]}", flush=True, file=sys.stderr)
    base = results["throughput"][next(iter(VARIANTS))]["pairs_per_second"]
    results["relative_to_default"] = {k: round(v["pairs_per_second"] / base, 2) for k, v in results["throughput"].items()}
    if args.full:
        from cart import train

        source = load_config(args.config)
        cfg = load_config(args.config, ["run=bench-train"])
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        cfg.run_dir.mkdir(parents=True)
        for name in ("corpus.jsonl", "corpus.manifest.json", "embeddings.safetensors", "embeddings.manifest.json",
                     "ids.safetensors", "ids.manifest.json", "ids.json", "ids.png", "rqvae.safetensors",
                     "trie.marisa"):
            if (source.run_dir / name).exists():
                shutil.copy(source.run_dir / name, cfg.run_dir / name)
        start = time.perf_counter()
        train.run(cfg)
        summary = json.loads((cfg.run_dir / "train.json").read_text())
        results["full_training"] = {"seconds": round(time.perf_counter() - start, 1), **summary}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
