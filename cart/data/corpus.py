"""Stage `cart corpus`: read a dataset source (cart/data/sources.py), check every item, write `corpus.jsonl`.

Reads one of: the built-in emoji set, a Karpathy-split JSON, a COCO captions JSON, a JSONL or CSV
manifest, a folder of media. Writes `checkpoints/<run>/corpus.jsonl`, one record per line:

    {"id": "1f431", "modality": "image", "path": "/abs/1f431.png", "split": "train",
     "texts": [{"text": "kitten", "kind": "caption"}, {"text": "cat face", "kind": "query", "set": "A"}],
     "meta": {...}}

Text kinds: `caption` (a training query), `generated` (added by `cart caption`),
`query` (held out for testing; `set` names the query set), `validation` (held out for
choosing: never trained on, never a test). Items of `corpus.query_splits` have their
texts held out as queries of a set named after the split; items of
`corpus.validation_splits` (`val`) as validation queries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cart import files
from cart.config import Config, to_dict
from cart.data import emoji, sources


def run(cfg: Config, force: bool = False) -> Path:
    """Build `corpus.jsonl` in the run folder from `cfg.corpus`; return its path. A corpus with other content
    than the run's present one, whose later stages were built from it, is refused unless `force`
    (`files.check_replace`)."""
    corpus_cfg = sources.expanded(cfg.corpus)
    records, skipped = sources.read_source(corpus_cfg)
    out = cfg.run_dir / files.CORPUS
    content = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    recipe = {"content": hashlib.sha256(content).hexdigest()}
    if files.check_replace(cfg.run_dir, files.CORPUS, recipe, force):
        print(f"corpus: {out} is up to date (the same {len(records)} items)")
        return out
    with files.atomic_path(out) as tmp:
        tmp.write_bytes(content)
    inputs = {Path(corpus_cfg.path).name: files.sha256_file(corpus_cfg.path)} if Path(corpus_cfg.path).is_file() else {}
    if corpus_cfg.source == "emoji":
        inputs = dict(emoji.PACKAGES)
    stats = sources.summarize(records)
    files.write_manifest(out, "corpus", to_dict(cfg), inputs, recipe=recipe, stats=stats, skipped=skipped)
    kinds = ", ".join(f"{n} {k}" for k, n in stats["texts"].items())
    print(f"corpus: {len(records)} items ({kinds}); {len(skipped)} skipped -> {out}")
    return out


def read(run_dir: Path) -> list[dict]:
    """The corpus records of a run, refusing a corpus that does not match its manifest."""
    path, _ = files.verified_input(run_dir, files.CORPUS)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
