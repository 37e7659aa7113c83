"""Which texts are queries for which item: the (query text, item) training pairs and the validation splits.

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

from cart import files
from cart.config import Config, load_config
from cart.errors import CartError

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


def held_out_by_id(records: list[dict], held_out: list[tuple[int, str]]) -> list[list[str]]:
    """The (row, text) pairs of a `texts` split as [item id, text]: what still names them once `cart add` or
    `cart remove` has moved the rows (the model's manifest keeps them so)."""
    return [[records[row]["id"], text] for row, text in held_out]


def held_out_rows(records: list[dict], by_id: list[list[str]]) -> list[tuple[int, str]]:
    """`held_out_by_id`'s pairs as (row, text) in `records` (items removed since left out)."""
    row_of = {record["id"]: row for row, record in enumerate(records)}
    return [(row_of[item], text) for item, text in by_id if item in row_of]


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


def split_pairs(records: list[dict], cfg: Config, held_out: list[tuple[int, str]] | None = None) -> Splits:
    """Training pairs from every training text, the validation splits, and every query's right answers.
    `held_out`: the `texts` split's (row, text) pairs when they are known already (`held_out_texts`)."""
    train_cfg = cfg.train
    relevant = items_by_text(records, TRAINING_KINDS)
    texts_of = [training_texts(record) for record in records]
    if not any(texts_of):
        raise CartError(f"{cfg.run_dir}/corpus.jsonl: no training texts (kinds {', '.join(TRAINING_KINDS)}): "
                        f"every text is a held-out query; nothing to train on")
    held_out = set(held_out_texts(records, cfg) if held_out is None else held_out)
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


def with_replay(train: Pairs, new_rows: set[int], replay: float, seed: int) -> Pairs:
    """The pairs of the `new_rows` items and `replay` times as many of the other items' pairs, drawn with
    `seed`: what continued training on added items trains on (DSI++: the new alone forgets the old)."""
    new = [i for i, row in enumerate(train.items) if row in new_rows]
    old = [i for i, row in enumerate(train.items) if row not in new_rows]
    chosen = sorted(new + random.Random(f"{seed}/replay").sample(old, min(len(old), round(replay * len(new)))))
    return Pairs([train.texts[i] for i in chosen], [train.items[i] for i in chosen])


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


def with_generated_captions(run_dir: Path, records: list[dict]) -> tuple[list[dict], str | None]:
    """The records with `cart caption`'s captions added as texts of kind `generated` (new dicts), and the
    sha256 of captions.jsonl; unchanged records and None when it has not run. Refuses captions of
    another corpus."""
    if not (Path(run_dir) / files.CAPTIONS).exists():
        return records, None
    path, manifest = files.verified_input(run_dir, files.CAPTIONS)
    files.require_built_from(manifest, files.CAPTIONS, run_dir, files.CORPUS, extended=True)  # added items have none
    with open(path, encoding="utf-8") as f:
        generated = {row["id"]: row["captions"] for row in map(json.loads, f)}
    return [{**r, "texts": r["texts"] + [{"text": c, "kind": "generated"} for c in generated.get(r["id"], [])]}
            for r in records], manifest["sha256"]
