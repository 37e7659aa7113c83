"""Scoring ranked results: the rank of a query's first right answer, and R@k / MRR@10 from it. Shared by
`cart train` (the validation splits) and `cart eval` (the held-out sets)."""

from __future__ import annotations

import numpy as np

CUTOFFS = (1, 5, 10)
DEPTH = 10  # results kept per query: R@10 and MRR@10 need ten
METRICS = ("R@1", "R@5", "R@10", "MRR@10")


def first_right(rows: np.ndarray, relevant: list[set[int]]) -> np.ndarray:
    """1-based rank of each query's first right answer in `rows`, 0 when none is there."""
    ranks = np.zeros(len(rows), dtype=np.int64)
    for i, (row, right) in enumerate(zip(rows, relevant)):
        hits = [rank for rank, item in enumerate(row, 1) if item in right]
        ranks[i] = hits[0] if hits else 0
    return ranks


def totals(rows: np.ndarray, relevant: list[set[int]]) -> np.ndarray:
    """(hits at each cutoff..., sum of reciprocal ranks, queries): sums that add up over shares of queries."""
    ranks = first_right(rows, relevant)
    found = ranks > 0
    hits = [int(np.sum(found & (ranks <= k))) for k in CUTOFFS]
    return np.array([*hits, float(np.sum(np.where(found, 1.0 / np.maximum(ranks, 1), 0.0))), len(rows)])


def from_totals(sums) -> dict:
    """R@k and MRR@10 (ranks are at most DEPTH) from `totals`, summed over any number of shares."""
    *hits, reciprocal, count = (float(v) for v in sums)
    count = max(count, 1.0)
    out = {f"R@{k}": round(h / count, 4) for k, h in zip(CUTOFFS, hits)}
    out["MRR@10"] = round(reciprocal / count, 4)
    return out


def metrics(rows: np.ndarray, relevant: list[set[int]]) -> dict:
    return from_totals(totals(rows, relevant))
