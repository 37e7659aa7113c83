"""What a training step reads: batches of like length, the frozen encoder's layer outputs computed once per
text, the identifier labels, hard negatives, distilled pairs, and GENIUS's query-target interpolation."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler

from cart.data.pairs import Pairs
from cart.errors import CartError
from cart.index.vocab import TokenLayout


class LengthGroupedBatches(BatchSampler):
    """Shuffled batches of similar token length: the padded memory, whose keys and values every decoder
    layer projects, shrinks from the longest text of a random batch (the joined tags) to the batch's own.
    Each epoch: shuffle, sort windows of 50 batches by length, cut, shuffle the batches; full batches
    only. The order depends on (seed, epoch) alone, so a resumed run skips into the same epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 50):
        super().__init__(range(len(lengths)), batch_size, drop_last=True)
        self.lengths, self.seed, self.window, self.epoch = lengths, seed, window, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(f"{self.seed}/{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        order = order[: len(self) * self.batch_size]
        span = self.window * self.batch_size
        order = [i for start in range(0, len(order), span)
                 for i in sorted(order[start: start + span], key=self.lengths.__getitem__)]
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        yield from batches


def token_lengths(texts: list[str], tokenizer, max_tokens: int) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]]


class LayerCache:
    """The layer outputs of a frozen encoder for every training text, computed once (the same each epoch):
    a training step then runs only the fusion and the decoder. (T, S, d) float32 a text."""

    def __init__(self, encoder, tokenizer, texts: list[str], max_tokens: int, device: torch.device,
                 batch_size: int = 256):
        self.index = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        unique = list(self.index)
        self.layers: list[torch.Tensor] = [None] * len(unique)
        order = sorted(range(len(unique)), key=lambda i: len(unique[i]))  # batches of like length pad less
        training = encoder.training
        encoder.eval()  # the features inference sees: never a dropout draw
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start: start + batch_size]
                encoded = tokenizer([unique[i] for i in rows], padding=True, truncation=True, max_length=max_tokens,
                                    return_tensors="pt").to(device)
                layers = encoder.layer_outputs(encoded["input_ids"], encoded["attention_mask"]).cpu()  # (B, T, S, d)
                for row, length, features in zip(rows, encoded["attention_mask"].sum(1).tolist(), layers):
                    self.layers[row] = features[:length].clone()
        encoder.train(training)

    @property
    def bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.layers)

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, S, d) layer outputs padded with zeros, and the (B, T) attention mask."""
        features = [self.layers[self.index[text]] for text in texts]
        length = max(len(f) for f in features)
        layers = torch.zeros(len(features), length, *features[0].shape[1:])
        mask = torch.zeros(len(features), length, dtype=torch.long)
        for i, f in enumerate(features):
            layers[i, : len(f)] = f
            mask[i, : len(f)] = 1
        return layers, mask


def identifier_labels(codes_as_tokens) -> torch.Tensor:
    """The decoder's targets: each item's identifier tokens (N, L) followed by EOS."""
    tokens = torch.as_tensor(codes_as_tokens)
    return torch.cat([tokens, torch.full((len(tokens), 1), TokenLayout.EOS)], dim=1)


class HardNegatives:
    """Hard negatives for the ranking loss (`train.rank_weight`): for a training pair, `count` items drawn
    from the `pool` nearest its item in the embeddings its identifiers were built from (they share long
    identifier prefixes, where beam search confuses them), never a right answer of its query. The draw
    depends on the batch's rows alone, so a resumed run draws the same ones."""

    def __init__(self, embeddings: torch.Tensor, pairs: Pairs, relevant: dict[str, set[int]], count: int,
                 pool: int = 20):
        x = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        width = min(pool + 1, len(x))  # + the item itself
        chunk = max(1, 2**26 // len(x))  # rows of the similarity matrix at a time: 256 MiB of float32
        self.nearest = torch.cat([(x[i: i + chunk] @ x.T).topk(width, dim=1).indices
                                  for i in range(0, len(x), chunk)]).numpy()
        self.pairs, self.relevant, self.count, self.items = pairs, relevant, count, len(x)

    def __call__(self, rows: list[int]) -> torch.Tensor:
        """(B, count) item rows."""
        rng = np.random.default_rng(rows)
        out = np.empty((len(rows), self.count), dtype=np.int64)
        for j, i in enumerate(rows):
            right = self.relevant.get(self.pairs.texts[i].lower(), set()) | {self.pairs.items[i]}
            candidates = [n for n in self.nearest[self.pairs.items[i]] if n not in right]
            if not candidates:  # a tiny corpus: any wrong item
                candidates = [n for n in range(self.items) if n not in right]
            if not candidates:
                raise CartError(f"train.rank_weight: every item is a right answer of {self.pairs.texts[i]!r}, "
                                f"so there is no negative to rank against")
            out[j] = rng.choice(candidates, self.count, replace=len(candidates) < self.count)
        return torch.from_numpy(out)


class Distilled:
    """Unlabelled queries labelled by a teacher, the encoder the identifiers came from (DGR's idea): each text's
    `top_k` items by the cosine of its embedding to the item embeddings, weighted softmax(cosine / temperature).
    Texts whose best cosine is below `min_cosine`, or above the second best by less than `min_margin` (the
    teacher hesitates), are dropped. Each epoch every text trains toward one item
    drawn from its weights: in expectation that is the cross-entropy toward the teacher's distribution over
    identifiers (soft targets) at the cost of one pair a text. The draw depends on (seed, epoch) alone."""

    def __init__(self, texts: list[str], vectors: torch.Tensor, items: torch.Tensor, top_k: int, temperature: float,
                 min_cosine: float, seed: int, min_margin: float = 0.0):
        cosine, rows = (vectors.float() @ items.float().T).topk(min(max(top_k, 2), len(items)), dim=1)
        margin = cosine[:, 0] - cosine[:, 1] if cosine.shape[1] > 1 else torch.full_like(cosine[:, 0], float("inf"))
        keep = ((cosine[:, 0] >= min_cosine) & (margin >= min_margin)).nonzero().flatten().tolist()
        cosine, rows = cosine[:, :top_k], rows[:, :top_k]
        self.texts = [texts[i] for i in keep]
        self.rows = rows[keep].numpy()
        self.weights = (cosine[keep] / temperature).softmax(dim=1).double().numpy()
        self.seed = seed

    def draw(self, epoch: int) -> list[int]:
        """Each text's item for this epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        picks = (rng.random((len(self.texts), 1)) > self.weights.cumsum(axis=1)).sum(axis=1)
        return self.rows[np.arange(len(self.texts)), np.minimum(picks, self.rows.shape[1] - 1)].tolist()

    def level_targets(self, rows: list[int], items: torch.Tensor, first: int, labels: torch.Tensor,
                      vocab_size: int) -> torch.Tensor:
        """`train.distill_targets=levels`: (B, L, V) targets of a batch's pairs (`rows`, their `items`), whose rows
        from `first` on are this object's texts in order, and `labels` every item's tokens. A labelled pair's are
        its item's tokens, one-hot; a distilled text's, at each level of its drawn item's identifier, the
        teacher's distribution over that level's token among its top-k items that share the drawn prefix
        before it. The level's cross-entropy is then the KL toward the teacher's conditional (up to a
        constant): what the drawn token gives in expectation, at once."""
        out = F.one_hot(labels[items], vocab_size).float()
        distilled = [j for j, row in enumerate(rows) if row >= first]
        if distilled:
            texts = [rows[j] - first for j in distilled]
            candidates = labels[torch.from_numpy(self.rows[texts])]  # (b, k, L)
            path = labels[items[distilled]].unsqueeze(1)  # (b, 1, L)
            shared = (candidates == path).int().cumprod(-1)  # 1 while a candidate follows the path
            before = torch.cat([torch.ones_like(shared[..., :1]), shared[..., :-1]], dim=-1)
            mass = torch.from_numpy(self.weights[texts]).float().unsqueeze(-1) * before
            # the drawn item is a candidate, so a level's mass is 0 only if its weight underflowed
            mass = mass / mass.sum(1, keepdim=True).clamp(min=torch.finfo(mass.dtype).tiny)
            out[distilled] = torch.zeros_like(out[distilled]).scatter_add_(2, candidates.transpose(1, 2),
                                                                           mass.transpose(1, 2))
        return out


def make_batch(rows: list[int], pairs: Pairs, labels: torch.Tensor, tokenizer, max_tokens: int,
               cache: LayerCache | None = None, negatives: HardNegatives | None = None,
               weights: torch.Tensor | None = None, soft=None) -> dict:
    """The model inputs of some pairs (token ids, or the cached layer outputs), their labels (the rows of
    `labels`, each item's identifier tokens ending in EOS) and items; with `negatives`, also the labels of each
    pair's hard negatives, (B, count, L + 1); with `weights` (one a pair), the pairs' loss weights; with `soft`
    ((rows, items) -> (B, L + 1, V), `Distilled.level_targets`), the soft labels the cross-entropy then reads."""
    texts = [pairs.texts[i] for i in rows]
    if cache is not None:
        layers, mask = cache.batch(texts)
        inputs = {"encoder_layers": layers, "attention_mask": mask}
    else:
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    targets = torch.tensor([pairs.items[i] for i in rows])
    batch = {**inputs, "labels": labels[targets], "items": targets}
    if negatives is not None:
        batch["negatives"] = labels[negatives(rows)]
    if weights is not None:
        batch["weights"] = weights[rows]
    if soft is not None:
        batch["soft_labels"] = soft(rows, targets)
    return batch


def toward_targets(layers: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, alpha: float,
                   share: float = 1.0) -> torch.Tensor:
    """GENIUS's query-target interpolation on a frozen MiniLM's layer outputs (B, T, S, d). A query's sentence
    embedding q (its last layer's masked mean m, normalised) becomes sqrt(s) q + sqrt(1 - s) t, t its item's
    embedding (B, d) and 1 - s ~ share x Beta(alpha, alpha) a dimension, normalised again and of m's length;
    every real token of the last layer moves by the same step, so the last layer's mean is the mixed
    embedding. Only the last layer lives in the items' space: the layers below stay as they are."""
    last = layers[:, :, -1]
    weights = mask.unsqueeze(-1).to(last.dtype)
    mean = (last * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, d)
    length = mean.norm(dim=-1, keepdim=True)
    s = 1 - share * torch.distributions.Beta(alpha, alpha).sample(mean.shape).to(mean)
    mixed = F.normalize(s.sqrt() * mean / length + (1 - s).sqrt() * targets, dim=-1) * length
    return torch.cat([layers[:, :, :-1], (last + (mixed - mean).unsqueeze(1) * weights).unsqueeze(2)], dim=2)


