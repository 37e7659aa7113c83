"""The prefix trie over valid identifiers: what may follow a prefix, and which item an identifier names.

Two parts. The prefix database is a marisa-trie of every identifier (compact,
memory-mapped when loaded from disk) that maps an identifier to its item. The
allowed-token tables answer "which tokens may follow this prefix" for a whole
batch of beams at once: for each level, the sorted edge keys `node * vocab +
token` of that level. A prefix walks down with one `searchsorted` per level,
and a node's children are one contiguous slice of the next level's keys, so a
step costs a few NumPy operations for the batch: no loop over beams, no scan
over identifiers. Node ids of level l + 1 are positions in level l's keys. Levels with few nodes (the
first ones: one root, K clusters, ...) also get a dense child table (node x token -> child or -1), so a
step there is one gather: at batch 1 a handful of small tensor operations would otherwise dominate.

The trie knows identifier tokens only; a decoder's start token is the caller's
to strip (GENRE's lesson: forget it and every lookup comes back empty).
"""

from __future__ import annotations

from pathlib import Path

import marisa_trie
import numpy as np
import torch

from cart.vocab import TokenLayout


DENSE_TABLE_MAX = 1 << 23  # entries (int32) of a level's dense child table; larger levels use searchsorted


def _as_key(tokens) -> str:
    # one character a token; code points past the UTF-16 surrogate block, which cannot be encoded
    return "".join(chr(t if t < 0xD800 else t + 0x800) for t in map(int, tokens))


class PrefixTrie:
    def __init__(self, tokens: np.ndarray, layout: TokenLayout, database: marisa_trie.Trie | None = None,
                 item_of_key: np.ndarray | None = None):
        """tokens: (N, L) decoder tokens of every item's identifier, row i naming item i."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != layout.length:
            raise ValueError(f"expected identifiers of length {layout.length}, got shape {tokens.shape}")
        self.layout = layout
        self.vocab = layout.vocab_size
        self.length = layout.length
        self.level_keys: list[np.ndarray] = []  # sorted edge keys node * vocab + token, one array a level
        node = np.zeros(len(tokens), dtype=np.int64)
        for level in range(self.length):
            edge = node * self.vocab + tokens[:, level]
            keys = np.unique(edge)
            self.level_keys.append(keys)
            node = np.searchsorted(keys, edge)
        if len(self.level_keys[-1]) != len(tokens):
            raise ValueError("identifiers are not unique")
        # children[l][node, token]: the child's node id at depth l + 1, -1 for none; None where too large
        self.children: list[np.ndarray | None] = []
        for level, keys in enumerate(self.level_keys):
            parents = 1 if level == 0 else len(self.level_keys[level - 1])
            if parents * self.vocab > DENSE_TABLE_MAX:
                self.children.append(None)
                continue
            table = np.full(parents * self.vocab, -1, dtype=np.int32)
            table[keys] = np.arange(len(keys), dtype=np.int32)
            self.children.append(table.reshape(parents, self.vocab))
        if database is None:
            keys = [_as_key(row) for row in tokens]
            database = marisa_trie.Trie(keys)
            item_of_key = np.empty(len(tokens), dtype=np.int64)
            item_of_key[[database[k] for k in keys]] = np.arange(len(tokens))
        self.database, self.item_of_key = database, item_of_key

    def nodes(self, prefixes, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(B, l) token prefixes -> (B,) node ids at depth l and (B,) bool: the prefix is in the trie.
        strict: a prefix not in the trie is an error naming it. (NumPy inside: for the few beams of a
        decoding step, a NumPy operation costs a microsecond where a torch one costs several.)"""
        prefixes = np.asarray(prefixes, dtype=np.int64)
        node = np.zeros(len(prefixes), dtype=np.int64)
        found = np.ones(len(prefixes), dtype=bool)
        for level in range(prefixes.shape[1]):
            tokens = prefixes[:, level]
            valid = (tokens >= 0) & (tokens < self.vocab)
            tokens = np.where(valid, tokens, 0)
            if self.children[level] is not None:
                position = self.children[level][node, tokens].astype(np.int64)
                found &= valid & (position >= 0)
            else:
                keys = self.level_keys[level]
                edge = node * self.vocab + tokens
                position = np.minimum(np.searchsorted(keys, edge), len(keys) - 1)
                found &= valid & (keys[position] == edge)
            if strict and not found.all():
                bad = prefixes[int(np.flatnonzero(~found)[0])].tolist()
                raise ValueError(f"prefix {bad} is not a prefix of any identifier")
            node = np.where(found, position, 0)
        return node, found

    def allowed_mask(self, prefixes, strict: bool = True) -> torch.Tensor:
        """(B, l) token prefixes, all of one length l -> (B, vocab) bool: the tokens that may follow.
        After a whole identifier (l == L) only EOS may follow. strict=False: a prefix not in the trie
        (a beam that beam search had to fill with a forbidden token) may only end, with EOS."""
        prefixes = np.asarray(prefixes, dtype=np.int64)
        batch, depth = prefixes.shape
        if depth > self.length:
            raise ValueError(f"prefix of length {depth} is longer than the identifiers ({self.length})")
        node, found = self.nodes(prefixes, strict)  # strict: refuses a sequence that is not an identifier
        if depth == self.length:
            mask = np.zeros((batch, self.vocab), dtype=bool)
        elif self.children[depth] is not None:
            mask = (self.children[depth][node] >= 0) & found[:, None]
        else:
            keys = self.level_keys[depth]
            start = np.searchsorted(keys, node * self.vocab)
            count = np.where(found, np.searchsorted(keys, (node + 1) * self.vocab) - start, 0)
            rows = np.repeat(np.arange(batch), count)
            # positions start[b], start[b] + 1, ..., start[b] + count[b] - 1 for every row at once
            within = np.arange(len(rows)) - np.repeat(np.cumsum(count) - count, count)
            mask = np.zeros((batch, self.vocab), dtype=bool)
            mask[rows, keys[np.repeat(start, count) + within] % self.vocab] = True
        mask[~found if depth < self.length else slice(None), TokenLayout.EOS] = True
        return torch.from_numpy(mask)

    def item_of(self, identifiers) -> np.ndarray:
        """(B, L) identifier tokens -> (B,) item indices, -1 where a row is not an identifier."""
        found = [self.database.get(_as_key(row), -1) for row in np.asarray(identifiers)]
        return np.array([self.item_of_key[k] if k >= 0 else -1 for k in found], dtype=np.int64)

    def save(self, path: Path) -> None:
        self.database.save(str(path))

    @classmethod
    def load(cls, path: Path, tokens: np.ndarray, layout: TokenLayout, item_of_key: np.ndarray) -> "PrefixTrie":
        database = marisa_trie.Trie()
        database.mmap(str(path))
        return cls(tokens, layout, database, item_of_key)
