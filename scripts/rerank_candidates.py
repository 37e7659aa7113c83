"""Choose `retrieve.rerank_candidates` on the validation splits against its cost: for each candidate count C,
the candidates of a C-beam search re-ranked at every pair of rerank weights (chosen on validation, as
`cart train` chooses them), the figures per validation split at that weight, and the cost of `CART + rerank`
with C beams in ms a query at batch 1 and batch 32 (the median of three rounds in which the counts take
turns), all in one run. Held-out query sets are never read.
Prints JSON.

    .venv/bin/python scripts/rerank_candidates.py [--run checkpoints/emoji] [--candidates 10,20,30,50]

Needs a run trained with `retrieve.rerank` (`make demo`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from cart.data import corpus, pairs
    from cart.retrieve.rerank import chosen_weights
    from cart.retrieve.retriever import Retriever

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "checkpoints/emoji"))
    parser.add_argument("--candidates", default="10,20,30,50")
    parser.add_argument("--timed", type=int, default=64, help="queries timed at batch 1 (batch 32: 4x as many)")
    args = parser.parse_args()
    counts = [int(c) for c in args.candidates.split(",")]
    retriever = Retriever.load(args.run, rerank=True, rerank_candidates=max(counts))
    stored = retriever.manifest["config"]  # the splits are drawn from the training settings and the seed
    cfg = pairs.splits_config(stored)
    records, _ = pairs.with_generated_captions(Path(args.run), corpus.read(Path(args.run)))
    splits = pairs.split_pairs(records, cfg)  # the splits `cart train` validated on
    reranker = retriever.reranker
    results = {"run": args.run, "weights_chosen_in_training": [reranker.weight, reranker.lexical_weight],
               "validation_queries": {name: len(p.texts) for name, p in splits.validation.items()}, "counts": {}}
    pool = [t for split in splits.validation.values() for t in split.texts]
    timed = random.Random(0).sample(pool, min(len(pool), 4 * args.timed))
    for count in counts:
        retriever.rerank_candidates = count
        decoded = {name: retriever.search_rows(split.texts, count, batch_size=128, rerank=False)
                   if count <= retriever.beam_width else _wide(retriever, split.texts, count)
                   for name, split in splits.validation.items()}
        weights, score, figures = chosen_weights({
            name: (*decoded[name], *reranker.features(split.texts, decoded[name][0]),
                   [splits.relevant[t.lower()] for t in split.texts]) for name, split in splits.validation.items()})
        results["counts"][count] = {"score": round(score, 4), "weights": weights, "validation": figures}
        print(f"rerank_candidates {count}: validation score {score:.4f} (weights {weights})", file=sys.stderr)
    # the counts take turns, three rounds, so that a slow spell of the machine does not fall on one of them
    times = {count: {1: [], 32: []} for count in counts}
    for _ in range(3):
        for count in counts:
            retriever.rerank_candidates = count
            times[count][1].append(_ms(retriever, timed[: args.timed], 1))
            times[count][32].append(_ms(retriever, timed, 32))
    for count in counts:
        results["counts"][count] |= {f"ms_per_query_batch_{b}": sorted(t)[1] for b, t in times[count].items()}
        results["counts"][count]["ms_rounds"] = times[count]
    print(json.dumps(results, indent=2))


def _wide(retriever, texts: list[str], count: int):
    """Pure beam search with `count` beams: the candidates rerank re-orders."""
    beam_width = retriever.beam_width
    retriever.beam_width = count
    try:
        return retriever.search_rows(texts, count, batch_size=128, rerank=False)
    finally:
        retriever.beam_width = beam_width


def _ms(retriever, queries: list[str], batch: int) -> float:
    """Milliseconds a query of `CART + rerank` (top 10) at this batch size, after a warm-up."""
    retriever.search_rows(queries[: max(batch, 8)], 10, batch_size=batch, rerank=True)
    start = time.perf_counter()
    retriever.search_rows(queries, 10, batch_size=batch, rerank=True)
    return round(1000 * (time.perf_counter() - start) / len(queries), 2)


if __name__ == "__main__":
    main()
