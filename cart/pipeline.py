"""`cart pipeline`: every stage in order on one config, as `make demo` runs it."""

from __future__ import annotations

import json
from pathlib import Path

from cart import files, train
from cart.config import Config
from cart.data import corpus
from cart.encoders import embed
from cart.eval import evaluate, report
from cart.generate import generate
from cart.index import build_ids
from cart.retrieve.retriever import Retriever, format_hits


def run(cfg: Config, force: bool = False) -> Path:
    """Every stage in order; what is up to date is kept, and `force` lets a stage replace an output that
    later ones were built from."""
    outputs = [corpus.run(cfg, force), embed.run(cfg, force), build_ids.run(cfg, force), train.run(cfg),
               evaluate.run(cfg)]
    history = json.loads((cfg.run_dir / files.TRAIN_LOG).read_text(encoding="utf-8"))["history"]
    print("\nvalidation by epoch (training-derived texts held out of training; the held-out query sets are not "
          "used), R@1 / R@10 / MRR@10:")
    for row in history:
        splits = "  ".join(f"{name} {f['R@1']:.3f} / {f['R@10']:.3f} / {f['MRR@10']:.3f}"
                           for name, f in row["validation"].items())
        print(f"  epoch {row['epoch']:>2}  step {row['step']:>5}  {splits}  training-query R@1 {row['train_r1']:.3f}")
    retriever = Retriever.load(cfg.run_dir, beam_width=cfg.retrieve.beam_width,  # examples and generation
                               rerank_candidates=cfg.retrieve.rerank_candidates,
                               untrained_by_cosine=cfg.retrieve.untrained_by_cosine)
    if cfg.retrieve.examples:
        score = "rerank score" if retriever.reranker is not None else "log-probability"
        print(f"\nexample retrievals (rank, {score}, item, path):")
        for query, hits in zip(cfg.retrieve.examples, retriever.search(cfg.retrieve.examples, k=3)):
            print(format_hits(query, hits))
    summary = json.loads((cfg.run_dir / files.EVAL).read_text(encoding="utf-8"))
    print("\nheld-out queries (never trained, selected or tuned on):")
    print(report.table(summary))
    if cfg.generate.prompt:
        print()
        outputs.append(generate.run(cfg, retriever=retriever))
    print("\noutputs:")
    for path in outputs:
        print(f"  {path}")
    print(f"  {cfg.run_dir / files.REPORT}  (the HTML report)")
    return cfg.run_dir
