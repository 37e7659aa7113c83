"""Training data: (query text, item) pairs, the validation splits, batches of like length, and the frozen
encoder's layer outputs computed once per text.

Every training text of an item (kinds `caption`, `generated`) is a query for it. The validation splits
(held-out query sets are never read) are the corpus's own validation queries and two carved from the
training texts:
- `V`: the texts of kind `validation` (for the emoji set, the names other vendors give an emoji; for
  Karpathy splits, the `val` captions), worded as users word queries, unlike the tags;
- `texts`: whole training texts held out (a tag, or the joined tags), `train.validation_fraction` of the
  pairs (at most `train.validation_max`), from items with 2+ texts, each keeping one. They are also left
  out of the text `cart embed` embeds for an item (`minilm-text`), so identifiers do not know them either;
- `names`: name-shaped queries, `train.validation_names` items' held-out tag subsets: 2..`subset_size` of
  an item's short training texts joined in random order ("hands raising"). Their tags are trained on one
  by one, the joined string never (the subset queries of training avoid it), as an item's label is made of
  words its tags use.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler

from cart import files
from cart.config import Config, load_config
from cart.errors import CartError
from cart.vocab import TokenLayout

TRAINING_KINDS = ("caption", "generated")  # text kinds that are training queries; `query` is held out


@dataclass
class Pairs:
    texts: list[str]
    items: list[int]  # corpus row of each text's item (= row of its identifier)


@dataclass
class Splits:
    train: Pairs
    validation: dict[str, Pairs]  # split name ("V", "texts", "names") -> its pairs
    relevant: dict[str, set[int]]  # lower-cased query -> every item having it as a training text (right answers)


def training_texts(record: dict) -> list[str]:
    """An item's distinct training texts, in corpus order."""
    return list(dict.fromkeys(t["text"] for t in record["texts"] if t["kind"] in TRAINING_KINDS))


def items_by_text(records: list[dict], kinds) -> dict[str, set[int]]:
    """Lower-cased text -> the rows having it as a text of one of `kinds` (`caption`, `generated`, or
    `query:SET` for held-out set SET): the right answers of a query equal to it, for validation and eval."""
    by_text: dict[str, set[int]] = {}
    for row, record in enumerate(records):
        for text in record["texts"]:
            kind = text["kind"] if text["kind"] != "query" else f"query:{text.get('set')}"
            if kind in kinds:
                by_text.setdefault(text["text"].lower(), set()).add(row)
    return by_text


def part_of(text: str, other: str) -> bool:
    """`text` is part of `other`: its words are a proper subset of the other's (case aside), as each tag
    of an emoji is part of the text that joins its tags. The one rule for "a text joining others"."""
    return frozenset(text.lower().split()) < frozenset(other.lower().split())


def item_document(record: dict) -> str:
    """An item's training text as one string: its distinct training texts joined by spaces, leaving out
    texts that are part of another one (for the emoji set: the tags, whose joined form is itself a text)."""
    texts = training_texts(record)
    return " ".join(t for t in texts if not any(part_of(t, other) for other in texts))


def held_out_texts(records: list[dict], cfg: Config) -> list[tuple[int, str]]:
    """The (row, text) pairs of the `texts` validation split, drawn with the run's seed from the corpus's
    own captions (generated ones are always trained on: `cart embed` never sees them)."""
    train_cfg = cfg.train
    pairs = [(row, text, len(texts)) for row, record in enumerate(records)
             for texts in [list(dict.fromkeys(x["text"] for x in record["texts"] if x["kind"] == "caption"))]
             for text in texts]
    candidates = [i for i, (_, _, count) in enumerate(pairs) if count > 1]
    random.Random(cfg.seed).shuffle(candidates)
    chosen, per_item = set(), {}
    for i in candidates:
        if len(chosen) >= min(train_cfg.validation_max, round(train_cfg.validation_fraction * len(pairs))):
            break
        row, _, count = pairs[i]
        if per_item.get(row, 0) < count - 1:  # leave every item at least one training text
            per_item[row] = per_item.get(row, 0) + 1
            chosen.add(i)
    return [pairs[i][:2] for i in sorted(chosen)]


def held_out_digest(held_out: list[tuple[int, str]]) -> str:
    """A short fingerprint of a `texts` split: `cart train` checks that `cart embed` left out the same texts."""
    return hashlib.sha256(json.dumps(held_out, ensure_ascii=False).encode()).hexdigest()[:16]


def without_texts(records: list[dict], held_out: list[tuple[int, str]]) -> list[dict]:
    """The records with the held-out (row, text) training texts removed (new dicts)."""
    drop = set(held_out)
    return [{**r, "texts": [t for t in r["texts"] if not (t["kind"] in TRAINING_KINDS and (row, t["text"]) in drop)]}
            for row, r in enumerate(records)]


SPLIT_SETTINGS = ("validation_fraction", "validation_max", "validation_names", "subset_queries", "subset_size")


def splits_config(stored: dict) -> Config:
    """The settings a run's splits were drawn with (its seed and the train settings of `SPLIT_SETTINGS`), from
    the config its model's manifest stored. Training's other settings (a distillation file, a device) need not
    hold where the model is used, so they are not loaded."""
    return load_config(None, [f"seed={stored['seed']}", *(f"train.{key}={json.dumps(stored['train'][key])}"
                                                          for key in SPLIT_SETTINGS if key in stored["train"])])


def split_pairs(records: list[dict], cfg: Config) -> Splits:
    """Training pairs from every training text, the validation splits, and every query's right answers."""
    train_cfg = cfg.train
    relevant = items_by_text(records, TRAINING_KINDS)
    texts_of = [training_texts(record) for record in records]
    if not any(texts_of):
        raise CartError(f"{cfg.run_dir}/corpus.jsonl: no training texts (kinds {', '.join(TRAINING_KINDS)}): "
                        f"every text is a held-out query; nothing to train on")
    held_out = set(held_out_texts(records, cfg))
    train = Pairs([], [])
    for row, texts in enumerate(texts_of):
        for text in texts:
            if (row, text) not in held_out:
                train.texts.append(text)
                train.items.append(row)
    given = Pairs([], [])
    for row, record in enumerate(records):
        for text in dict.fromkeys(t["text"] for t in record["texts"] if t["kind"] == "validation"):
            given.texts.append(text)
            given.items.append(row)
            relevant.setdefault(text.lower(), set()).add(row)  # one name of several items: each is right
    validation = {"V": given,
                  "texts": Pairs([text for _, text in sorted(held_out)], [row for row, _ in sorted(held_out)])}
    by_item: dict[int, list[str]] = {}
    for text, row in zip(train.texts, train.items):
        by_item.setdefault(row, []).append(text)
    names = Pairs([], [])
    if train_cfg.validation_names:
        rng = random.Random(f"{cfg.seed}/names")
        rows = sorted(by_item)
        rng.shuffle(rows)
        for row in rows:
            made = subset_queries(by_item[row], 1, train_cfg.subset_size, rng)
            if made and made[0].lower() not in relevant:
                names.texts.append(made[0])
                names.items.append(row)
                if len(names.texts) == train_cfg.validation_names:
                    break
        validation["names"] = names
    for text, row in zip(names.texts, names.items):
        relevant.setdefault(text.lower(), set()).add(row)
    if train_cfg.subset_queries:
        rng = random.Random(f"{cfg.seed}/subsets")
        # a subset may rebuild a held-out text (the joined tags, in another order it would still differ)
        avoid = {text.lower() for pairs in validation.values() for text in pairs.texts}
        for row, texts in by_item.items():
            for text in subset_queries(texts, train_cfg.subset_queries, train_cfg.subset_size, rng, avoid):
                train.texts.append(text)
                train.items.append(row)
                relevant.setdefault(text.lower(), set()).add(row)
    return Splits(train, {name: pairs for name, pairs in validation.items() if pairs.texts}, relevant)


def subset_queries(texts: list[str], count: int, largest: int, rng: random.Random,
                   avoid: set[str] = frozenset()) -> list[str]:
    """Up to `count` distinct new queries, each 2..`largest` of an item's short training texts in random
    order, joined by spaces (tags -> "hands raising": the shape of a name). Short texts are those no other
    text is `part_of` (so a text joining the others is left out).
    Made from the texts given only (training texts: never validation or held-out queries); none equals a
    text given or one in `avoid` (lower-cased)."""
    short = [text for text in texts if not any(part_of(other, text) for other in texts)]
    if len(short) < 2:
        return []
    made, existing = [], {text.lower() for text in texts} | set(avoid)
    for _ in range(4 * count):  # a few tries: small items have few distinct subsets
        chosen = rng.sample(short, rng.randint(2, min(largest, len(short))))
        query = " ".join(chosen)
        if query.lower() not in existing:
            existing.add(query.lower())
            made.append(query)
            if len(made) == count:
                break
    return made


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


def unlabelled_texts(path: str | Path, records: list[dict]) -> list[str]:
    """The distinct texts of a file, one a line, without empty lines and without any text equal (lower case,
    every run of other characters than letters and digits one space) to a text of the corpus of any kind: a
    held-out query, a validation query or a training text is never a distilled one."""
    taken = {normalized(t["text"]) for record in records for t in record["texts"]}
    with open(Path(path).expanduser(), encoding="utf-8") as f:
        lines = dict.fromkeys(line.strip() for line in f)
    return [line for line in lines if line and normalized(line) and normalized(line) not in taken]


def normalized(text: str) -> str:
    """Lower case, every run of characters other than letters and digits one space: "Clock_Face-7" -> "clock
    face 7"."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def make_batch(rows: list[int], pairs: Pairs, labels: torch.Tensor, tokenizer, max_tokens: int,
               cache: LayerCache | None = None, negatives: HardNegatives | None = None,
               weights: torch.Tensor | None = None) -> dict:
    """The model inputs of some pairs (token ids, or the cached layer outputs), their labels (the rows of
    `labels`, each item's identifier tokens ending in EOS) and items; with `negatives`, also the labels of each
    pair's hard negatives, (B, count, L + 1); with `weights` (one a pair), the pairs' loss weights."""
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
    return batch


def toward_targets(layers: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """GENIUS's query-target interpolation on a frozen MiniLM's layer outputs (B, T, S, d). A query's sentence
    embedding q (its last layer's masked mean m, normalised) becomes sqrt(s) q + sqrt(1 - s) t, t its item's
    embedding (B, d) and s ~ Beta(alpha, alpha) a dimension, normalised again and of m's length; every real
    token of the last layer moves by the same step, so the last layer's mean is the mixed embedding. Only the
    last layer lives in the items' space: the layers below stay as they are."""
    last = layers[:, :, -1]
    weights = mask.unsqueeze(-1).to(last.dtype)
    mean = (last * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, d)
    length = mean.norm(dim=-1, keepdim=True)
    s = torch.distributions.Beta(alpha, alpha).sample(mean.shape).to(mean)
    mixed = F.normalize(s.sqrt() * mean / length + (1 - s).sqrt() * targets, dim=-1) * length
    return torch.cat([layers[:, :, :-1], (last + (mixed - mean).unsqueeze(1) * weights).unsqueeze(2)], dim=2)


def with_generated_captions(run_dir: Path, records: list[dict]) -> tuple[list[dict], str | None]:
    """The records with `cart caption`'s captions added as texts of kind `generated` (new dicts), and the
    sha256 of captions.jsonl; unchanged records and None when it has not run. Refuses captions of
    another corpus."""
    if not (Path(run_dir) / files.CAPTIONS).exists():
        return records, None
    path, manifest = files.verified_input(run_dir, files.CAPTIONS)
    files.require_built_from(manifest, files.CAPTIONS, run_dir, files.CORPUS)
    with open(path, encoding="utf-8") as f:
        generated = {row["id"]: row["captions"] for row in map(json.loads, f)}
    return [{**r, "texts": r["texts"] + [{"text": c, "kind": "generated"} for c in generated.get(r["id"], [])]}
            for r in records], manifest["sha256"]
