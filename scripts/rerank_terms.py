"""What each term of the rerank adds, on one trained run (`retrieve.rerank`): the candidates of one beam
search with the run's `retrieve.rerank_candidates` beams re-ordered by cosine + w * log-probability (v = 0)
and by the full rerank (+ v * BM25), each pair of weights chosen on the validation splits as `cart train`
chooses it; then both on the held-out sets with the weights so chosen (reported, chosen on nothing). The
full rerank's held-out figures agree with `cart eval`'s `CART + rerank` (the same beams and weights). Prints JSON.
`--candidates` measures another count than the run trained with, the weights chosen again on validation.

    .venv/bin/python scripts/rerank_terms.py checkpoints/emoji [--candidates 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from cart.data import corpus, pairs
    from cart.eval.evaluate import held_out_queries, relevant_items
    from cart.retrieve.rerank import GRID, chosen_weights
    from cart.retrieve.retriever import Retriever

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--candidates", type=int, default=None,
                        help="rerank this many beam candidates (default: the run's retrieve.rerank_candidates)")
    args = parser.parse_args()
    retriever = Retriever.load(args.run, rerank=True, rerank_candidates=args.candidates)
    stored = retriever.manifest["config"]
    cfg = pairs.splits_config(stored)
    records, _ = pairs.with_generated_captions(args.run, corpus.read(args.run))
    beams = retriever.rerank_candidates

    retriever.beam_width = beams  # pure beam search as wide as the rerank's: the candidates it re-orders

    def candidates(texts: list[str], relevant: list[set[int]]) -> tuple:
        """The beams' rows and log-probabilities, each candidate's cosine and lexical score, the right answers."""
        rows, log_probs = retriever.search_rows(texts, beams, batch_size=128, rerank=False)
        return (rows, log_probs, *retriever.reranker.features(texts, rows), relevant)

    splits = pairs.split_pairs(records, cfg)  # the splits `cart train` chose on
    validation = {name: candidates(split.texts, [splits.relevant[t.lower()] for t in split.texts])
                  for name, split in splits.validation.items()}
    query_sets = held_out_queries(records)
    relevant = relevant_items(records, query_sets, stored["eval"]["relevant_kinds"])
    held_out = {name: candidates([text for text, _ in pairs], relevant[name]) for name, pairs in query_sets.items()}
    results = {"run": str(args.run), "candidates": beams}
    for label, grid in (("cosine + log-probability", [g for g in GRID if g[1] == 0]), ("+ BM25", GRID)):
        weights, score, figures = chosen_weights(validation, grid)
        results[label] = {"weights": weights, "validation_score": round(score, 4), "validation": figures,
                          "held_out": chosen_weights(held_out, [weights])[2]}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
