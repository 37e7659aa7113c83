"""Two-stage retrieval (`retrieve.rerank`, the row "CART + rerank"): the candidates of beam search re-scored by
the cosine of the query's and the item's embeddings, plus a weight times the beam's log-probability.

The item embeddings are the run's own (`cart embed`); a query is embedded by the same encoder's text side
(MiniLM for `minilm-text`, ImageBind's text tower for `imagebind`). Only the beam's candidates are scored, so
the cost stays flat in corpus size. The weight is chosen on the validation splits by `cart train`
(`WEIGHTS`, by mean MRR@10) and kept in the model's manifest. Pure CART is always reported beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from cart import files

WEIGHTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # the log-probability's weight, chosen on validation


def rerank(rows: np.ndarray, log_probs: np.ndarray, queries: torch.Tensor, items: torch.Tensor,
           weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Beam candidates `rows` (Q, k) with their `log_probs`, re-ordered by cosine(query, item) + weight *
    log-probability, best first; missing candidates (-1) stay last. `queries` (Q, D) and `items` (N, D) are
    L2-normalised embeddings."""
    found = rows >= 0
    cosine = torch.einsum("qd,qkd->qk", queries.float(), items[np.maximum(rows, 0)].float()).numpy()
    scores = np.where(found, cosine + weight * np.where(found, log_probs, 0.0), -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def item_embeddings(run_dir: Path) -> torch.Tensor:
    """The run's item embeddings (`cart embed`'s, verified against their manifest), L2-normalised, (N, D)."""
    path, _ = files.verified_input(run_dir, files.EMBEDDINGS)
    return torch.nn.functional.normalize(load_file(str(path))["embeddings"].float(), dim=-1)
