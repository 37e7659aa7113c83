"""The prefix trie over valid identifiers: what may follow a prefix, and which item an identifier names.

Two parts. The prefix database is a marisa-trie of every identifier (compact,
memory-mapped when loaded from disk) that maps an identifier to its item. The
allowed-token tables answer "which tokens may follow this prefix" for a whole
batch of beams at once: for each level, the sorted edge keys `node * vocab +
token` of that level. A prefix walks down with one `searchsorted` per level,
and a node's children are one contiguous slice of the next level's keys, so a
step costs a few NumPy operations for the batch: no loop over beams, no scan
over identifiers. Node ids of level l + 1 are positions in level l's keys. Levels with few nodes (the
first ones: one root, K clusters, ...) also get a dense child table (node x code -> child or -1), so a
step there is one gather: at batch 1 a handful of small tensor operations would otherwise dominate.
What may follow a prefix of length l is always a code of level l (or EOS), so the answer is a mask over
that level's codes alone, as wide as the level, not the vocabulary, and in log space (0 or -inf, added to
the scores: a masked fill of a bool mask costs ten times as much on a CPU); the dense levels keep it as a
table too (STATIC's lesson: the constraint must cost next to nothing beside the model's step).

Our beam search does not walk from the root at all: each beam keeps its node, and `child` steps a batch
of nodes down one code (a lookup a beam); node -1, a beam that left the trie, needs no test of its own
(the dense tables' last row: no child, every code -inf).

The trie knows identifier tokens only; a decoder's start token is the caller's
to strip (GENRE's lesson: forget it and every lookup comes back empty).
"""

from __future__ import annotations

from pathlib import Path

import marisa_trie
import numpy as np
import torch

from cart.index.vocab import TokenLayout


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
        # children[l][node, code]: the child's node id at depth l + 1, -1 for none; log_masks[l] the same as
        # 0 or -inf; None where too large. Their last row stands for "no node" (-1, a beam that left the
        # trie): no child, every code -inf, so a missing node needs no test of its own. Where the tables
        # are too large, first_child[l][node] is where the node's children start in level l's keys (a CSR
        # row pointer: they end where the next node's start).
        self.children: list[np.ndarray | None] = []
        self.log_masks: list[np.ndarray | None] = []
        self.first_child: list[np.ndarray | None] = []
        for level, keys in enumerate(self.level_keys):
            parents, width = 1 if level == 0 else len(self.level_keys[level - 1]), layout.level_sizes[level]
            if parents * width > DENSE_TABLE_MAX:
                self.children.append(None)
                self.log_masks.append(None)
                self.first_child.append(np.searchsorted(keys, np.arange(parents + 1) * self.vocab))
                continue
            self.first_child.append(None)
            table = np.full((parents + 1, width), -1, dtype=np.int32)
            table[keys // self.vocab, keys % self.vocab - layout.offsets[level]] = np.arange(len(keys), dtype=np.int32)
            self.children.append(table)
            self.log_masks.append(np.where(table >= 0, np.float32(0), np.float32(-np.inf)))
        if database is None:
            keys = [_as_key(row) for row in tokens]
            database = marisa_trie.Trie(keys)
            item_of_key = np.empty(len(tokens), dtype=np.int64)
            item_of_key[[database[k] for k in keys]] = np.arange(len(tokens))
        self.database, self.item_of_key = database, item_of_key

    def nodes(self, prefixes, strict: bool = True) -> np.ndarray:
        """(B, l) token prefixes -> (B,) node ids at depth l, -1 for a prefix not in the trie (strict: an
        error naming it). (NumPy inside: for the few beams of a decoding step, a NumPy operation costs a
        microsecond where a torch one costs several.)"""
        prefixes = np.asarray(prefixes, dtype=np.int64)
        node = np.zeros(len(prefixes), dtype=np.int64)
        for depth in range(prefixes.shape[1]):
            codes = prefixes[:, depth] - self.layout.offsets[depth]
            in_level = (codes >= 0) & (codes < self.layout.level_sizes[depth])
            node = np.where(in_level, self.child(node, depth, np.where(in_level, codes, 0)), -1)
            if strict and (node < 0).any():
                bad = prefixes[int(np.flatnonzero(node < 0)[0])].tolist()
                raise ValueError(f"prefix {bad} is not a prefix of any identifier")
        return node

    def child(self, node: np.ndarray, depth: int, codes: np.ndarray) -> np.ndarray:
        """One step down: (B,) nodes at `depth` (-1: none) and the (B,) codes of level `depth` that follow
        them -> (B,) child nodes at depth + 1, -1 where there is none. Beam search carries its beams' nodes
        this way, one lookup a beam and a step, instead of walking every prefix from the root."""
        if self.children[depth] is not None:
            return self.children[depth][node, codes]  # node -1: the table's last row, no child
        keys = self.level_keys[depth]
        edge = np.asarray(node, dtype=np.int64) * self.vocab + codes + self.layout.offsets[depth]
        position = np.minimum(np.searchsorted(keys, edge), len(keys) - 1)  # node -1: a negative edge, not found
        return np.where(keys[position] == edge, position, -1)

    def log_mask(self, prefixes, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(B, l) token prefixes, all of one length l -> (B, V_l) float32 over level l's codes (tokens
        `layout.level_range(l)`): 0 for a code that may follow, -inf for one that may not; and (B,) bool: the
        rows that may only end, with EOS: every row after a whole identifier (l == L, where the mask has no
        columns), and with strict=False a prefix not in the trie (a beam that beam search had to fill with
        a forbidden token; its mask row is all -inf)."""
        prefixes = np.asarray(prefixes, dtype=np.int64)
        batch, depth = prefixes.shape
        if depth > self.length:
            raise ValueError(f"prefix of length {depth} is longer than the identifiers ({self.length})")
        node = self.nodes(prefixes, strict)  # strict: refuses a sequence that is not an identifier
        if depth == self.length:
            return np.zeros((batch, 0), dtype=np.float32), np.ones(batch, dtype=bool)
        return self.level_mask(node, depth), node < 0

    def level_mask(self, node: np.ndarray, depth: int) -> np.ndarray:
        """(B,) nodes at `depth` < L (-1: none) -> (B, V_depth) float32 over the level's codes: 0 for a code
        that may follow the node, -inf for one that may not (every code for no node)."""
        if self.log_masks[depth] is not None:
            return self.log_masks[depth][node]  # node -1: the table's last row, all -inf
        keys, first_child = self.level_keys[depth], self.first_child[depth]
        start = first_child[node]
        count = np.maximum(first_child[node + 1] - start, 0)  # node -1: first_child[0] - first_child[-1] < 0
        rows = np.repeat(np.arange(len(node)), count)
        # positions start[b], start[b] + 1, ..., start[b] + count[b] - 1 for every row at once
        within = np.arange(len(rows)) - np.repeat(np.cumsum(count) - count, count)
        mask = np.full((len(node), self.layout.level_sizes[depth]), -np.inf, dtype=np.float32)
        mask[rows, keys[np.repeat(start, count) + within] % self.vocab - self.layout.offsets[depth]] = 0
        return mask

    def allowed_mask(self, prefixes, strict: bool = True) -> torch.Tensor:
        """`log_mask` as one (B, vocab) bool mask over every token (EOS included)."""
        level_mask, ending = self.log_mask(prefixes, strict)
        mask = np.zeros((len(level_mask), self.vocab), dtype=bool)
        depth = np.asarray(prefixes).shape[1]
        if depth < self.length:
            mask[:, slice(*self.layout.level_range(depth))] = level_mask == 0
        mask[:, TokenLayout.EOS] = ending
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
