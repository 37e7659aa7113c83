"""The decoder's vocabulary (a neutral module: the trie, the model and the training data use it without
pulling in the identifier builders and their scikit-learn and vector-quantize-pytorch)."""

from __future__ import annotations

import numpy as np


class TokenLayout:
    """The decoder's vocabulary: two special tokens, then one token range per identifier level.

    A code c at level l is the token `offsets[l] + c`, so the same code at two levels is two tokens.
    PAD is also the decoder start token (as in T5); EOS ends every identifier.
    """

    PAD, EOS = 0, 1
    SPECIAL = 2

    def __init__(self, level_sizes: list[int]):
        self.level_sizes = [int(s) for s in level_sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]]).astype(np.int64) + self.SPECIAL
        self.vocab_size = self.SPECIAL + sum(self.level_sizes)

    @property
    def length(self) -> int:
        return len(self.level_sizes)

    def to_tokens(self, codes: np.ndarray) -> np.ndarray:
        """(N, L) codes -> (N, L) decoder tokens."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.shape[-1] != self.length or (codes < 0).any() or (codes >= self.level_sizes).any():
            raise ValueError(f"codes do not fit the layout with level sizes {self.level_sizes}")
        return codes + self.offsets

    def to_codes(self, tokens: np.ndarray) -> np.ndarray:
        """(N, L) decoder tokens -> (N, L) codes; the inverse of to_tokens."""
        codes = np.asarray(tokens, dtype=np.int64) - self.offsets
        if tokens.shape[-1] != self.length or (codes < 0).any() or (codes >= self.level_sizes).any():
            raise ValueError(f"tokens are not identifier tokens of the layout with level sizes {self.level_sizes}")
        return codes

    def level_range(self, level: int) -> tuple[int, int]:
        return int(self.offsets[level]), int(self.offsets[level]) + self.level_sizes[level]
