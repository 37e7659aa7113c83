"""Two-stage retrieval (`retrieve.rerank`, the row "CART + rerank"): the candidates of beam search re-scored by
the cosine of the query's and the item's embeddings, plus a weight times the beam's log-probability, plus a
weight times the candidate's BM25 score over the item's training texts (divided by the best among the
query's candidates).

The item embeddings are the run's own (`cart embed`); a query is embedded by the same encoder's text side
(MiniLM for `minilm-text`, ImageBind's text tower for `imagebind`). The BM25 index holds the training texts
`cart train` trained on (never the texts its validation holds out). Only the beam's candidates are re-ordered,
so what comes back is always the beam's. The two weights are chosen on the validation splits by `cart train`
(`WEIGHTS` x `LEXICAL_WEIGHTS`, by mean MRR@10) and kept in the model's manifest. Pure CART is always
reported beside it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from cart import files
from cart.data import pairs
from cart.retrieve import scoring
from cart.retrieve.baselines import BM25

WEIGHTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # the log-probability's weight, chosen on validation
LEXICAL_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)  # the BM25 score's, chosen beside it
GRID = tuple(itertools.product(WEIGHTS, LEXICAL_WEIGHTS))


def rerank(rows: np.ndarray, log_probs: np.ndarray, cosine: np.ndarray, lexical: np.ndarray,
           weight: float, lexical_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Beam candidates `rows` (Q, k) re-ordered by cosine + weight * log-probability + lexical_weight *
    lexical, best first; missing candidates (-1) stay last. `cosine` and `lexical`: each candidate's (Q, k)."""
    found = rows >= 0
    scores = np.where(found, cosine + weight * np.where(found, log_probs, 0.0) + lexical_weight * lexical, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


@dataclass
class Reranker:
    """What the rerank needs beside the beam: the query encoder, the item embeddings (N, D), L2-normalised,
    a BM25 index of the items' training texts, and the two weights."""
    encoder: object
    items: torch.Tensor
    index: BM25
    weight: float = 0.0
    lexical_weight: float = 0.0

    def query_vectors(self, queries: list[str]) -> torch.Tensor:
        """(Q, D) the queries embedded by the run's encoder's text side, L2-normalised, on the CPU."""
        return self.encoder.encode_text(queries).float().cpu()

    def features(self, queries: list[str], rows: np.ndarray,
                 vectors: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) cosine and lexical score of each candidate (0 where missing); the lexical score is BM25
        divided by the best of the query's candidates, so it lies in [0, 1] whatever the corpus. `vectors`:
        the queries' `query_vectors` when the caller has them."""
        vectors = self.query_vectors(queries) if vectors is None else vectors
        cosine = torch.einsum("qd,qkd->qk", vectors, self.items[np.maximum(rows, 0)].float()).numpy()
        bm25 = self.index.candidate_scores(queries, rows)
        return cosine, bm25 / np.maximum(bm25.max(axis=1, keepdims=True), 1e-9)

    def __call__(self, queries: list[str], rows: np.ndarray, log_probs: np.ndarray,
                 vectors: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        cosine, lexical = self.features(queries, rows, vectors)
        return rerank(rows, log_probs, cosine, lexical, self.weight, self.lexical_weight)


def chosen_weights(splits: dict[str, tuple], grid=GRID) -> tuple[tuple[float, float], float, dict]:
    """The pair of weights of `grid` with the best MRR@10 averaged over `splits` (name -> (rows, log_probs,
    cosine, lexical, right answers), one process's whole split), that mean, and each split's figures at it:
    the choice `cart train` makes, for scripts that measure the rerank on one machine."""
    def figures(weights):
        return {name: scoring.metrics(rerank(rows, log_probs, cosine, lexical, *weights)[0][:, :scoring.DEPTH], relevant)
                for name, (rows, log_probs, cosine, lexical, relevant) in splits.items()}

    scored = [(float(np.mean([f["MRR@10"] for f in by_split.values()])), weights, by_split)
              for weights in grid for by_split in [figures(weights)]]
    score, weights, by_split = max(scored, key=lambda x: x[0])
    return weights, score, by_split


def lexical_index(records: list[dict], held_out: list[tuple[int, str]]) -> BM25:
    """BM25 over each item's training texts as `cart train` trains on them (`records` with the generated
    captions): the (row, text) pairs its validation holds out (`pairs.held_out_texts`) left out."""
    return BM25(pairs.without_texts(records, held_out))


def item_embeddings(run_dir: Path) -> torch.Tensor:
    """The run's item embeddings (`cart embed`'s, verified against their manifest), L2-normalised, (N, D)."""
    path, _ = files.verified_input(run_dir, files.EMBEDDINGS)
    return torch.nn.functional.normalize(load_file(str(path))["embeddings"].float(), dim=-1)
