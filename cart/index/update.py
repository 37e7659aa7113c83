"""Stages `cart add` and `cart remove`: items into a trained run without training again, and out of it.

`cart add` reads new items from any source `cart corpus` reads and checks them as it does (an id the
run has is a duplicate), embeds them with the run's encoder and settings, and gives each the prefix of
its most similar item with a free counter (`identifiers.code_new_items`): a prefix the model has learnt,
so beam search reaches it; rerank takes the added items under a prefix the beam found as candidates
beside their trained sibling (`Retriever`), and its cosine tells them apart.
`cart remove` drops items. Both write new versions of corpus.jsonl, embeddings.safetensors,
ids.safetensors, trie.marisa, ids.json and ids.png with their manifests, staged and moved in as one
step (`files.publish_files`): a kill leaves the run as it was or as it is after, never between. The
model folder is untouched; the new manifests name the versions they extend, which the model accepts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cart import encoders, files
from cart.config import load_config
from cart.data import corpus, sources
from cart.devices import pick_device
from cart.errors import CartError
from cart.index import build_ids, identifiers
from cart.index.identifiers import Codes
from cart.index.trie import PrefixTrie
from cart.settings import EmbedConfig



@dataclass
class Change:
    """What `add` or `remove` did (or, dry, would do)."""
    items_before: int
    items_after: int
    ids: list[str]  # the items added or removed
    identifiers: np.ndarray  # (n, L) their codes
    seconds: float = 0.0
    moved: int = 0  # added items under another prefix than their most similar item's: its counters were all taken


def add(run_dir: Path, overrides: list[str] = (), dry_run: bool = False) -> Change:
    """Add the items of the source `overrides` name (`corpus.path=...`, `corpus.source=...`, other
    `corpus.*` settings; the rest are the run's own) to the run; the caller holds `files.run_lock`."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    records, ids, embed_manifest = _inputs(run_dir)
    if ids.layout.length < 2:
        raise CartError(f"{run_dir / files.IDS}: identifiers of one level (ids.scheme=atomic) have no prefix to put "
                        f"new items under: rebuild the identifiers with them (`cart ids`) and train again")
    stored = files.read_manifest(run_dir / files.CORPUS)["config"]
    corpus_cfg = sources.expanded(_corpus_settings(stored, overrides))
    new, skipped = sources.read_source(corpus_cfg, seen={r["id"]: f"{run_dir / files.CORPUS}" for r in records})
    embed_cfg = EmbedConfig(**embed_manifest["config"]["embed"])
    x = _embed(new, embed_cfg)
    items = load_file(str(run_dir / files.EMBEDDINGS))["embeddings"]
    try:
        codes, moved = identifiers.code_new_items(x, items, ids.codes, ids.layout.level_sizes[-1])
    except ValueError as e:
        raise CartError(f"cart add: {e}: rebuild the identifiers with the new items (`cart ids`) and train again") from None
    change = Change(len(records), len(records) + len(new), [r["id"] for r in new], codes, moved=int(moved.sum()))
    if not dry_run:
        _publish(run_dir, records + new, torch.cat([items, x]), np.concatenate([ids.codes, codes]), ids,
                 load_file(str(run_dir / files.IDS)),
                 {"added": len(new), "source": corpus_cfg.path or corpus_cfg.source, "skipped": skipped}, "add",
                 change.ids)
    change.seconds = time.perf_counter() - start
    return change


def remove(run_dir: Path, item_ids: list[str], dry_run: bool = False) -> Change:
    """Remove the items `item_ids` from the run: gone from the corpus and the trie, never returned again."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    records, ids, _ = _inputs(run_dir)
    row_of = {r["id"]: row for row, r in enumerate(records)}
    missing = [i for i in item_ids if i not in row_of]
    if missing:
        raise CartError(f"no item {missing[0]!r} in {run_dir / files.CORPUS}" + (
            f" (nor {len(missing) - 1} more of those given)" if len(missing) > 1 else ""))
    gone = sorted({row_of[i] for i in item_ids})
    keep = np.setdiff1d(np.arange(len(records)), gone)
    if len(keep) < 2:
        raise CartError(f"{run_dir}: removing them would leave {len(keep)} item(s); a run needs at least 2")
    change = Change(len(records), len(keep), [records[row]["id"] for row in gone], ids.codes[gone])
    if not dry_run:
        embeddings = load_file(str(run_dir / files.EMBEDDINGS))["embeddings"][torch.from_numpy(keep)]
        _publish(run_dir, [records[row] for row in keep], embeddings, ids.codes[keep], ids,
                 load_file(str(run_dir / files.IDS)), {"removed": change.ids}, "remove", [])
    change.seconds = time.perf_counter() - start
    return change


def describe(change: Change, command: str, dry_run: bool) -> str:
    """What `cart add` / `cart remove` did, for the terminal: a summary line, then an item a line (the
    first 20)."""
    verb = {"add": "added", "remove": "removed"}[command]
    head = (f"{command}: {'would have ' if dry_run else ''}{verb} {len(change.ids)} items: {change.items_before} -> "
            f"{change.items_after} in the run")
    if command == "add":
        head += f"; {change.moved} under another prefix than their most similar item's (its counters all taken)"
    lines = [head + ("" if dry_run else f" ({change.seconds:.1f} s)")]
    lines += [f"  {item:<24} {' '.join(map(str, codes))}" for item, codes in zip(change.ids[:20], change.identifiers.tolist())]
    if len(change.ids) > 20:
        lines.append(f"  ... and {len(change.ids) - 20} more")
    return "\n".join(lines)


def _inputs(run_dir: Path):
    """The run's corpus, identifiers and the manifest of its embeddings, each checked against the others."""
    if not run_dir.is_dir():
        raise CartError(f"run folder not found: {run_dir}")
    records = corpus.read(run_dir)
    ids = build_ids.load(run_dir)  # built from the present embeddings
    _, embed_manifest = files.verified_input(run_dir, files.EMBEDDINGS)
    files.require_built_from(embed_manifest, files.EMBEDDINGS, run_dir, files.CORPUS)
    if len(ids.codes) != len(records):
        raise CartError(f"{run_dir / files.IDS} has {len(ids.codes)} identifiers for {len(records)} corpus items: "
                        f"rerun `cart embed` and `cart ids`")
    return records, ids, embed_manifest


def _corpus_settings(stored: dict, overrides: list[str]):
    """The run's corpus settings with `overrides` (corpus.* only) applied, checked as a config's are."""
    other = [o for o in overrides if not o.startswith("corpus.")]
    if other:
        raise CartError(f"override {other[0]!r}: `cart add` takes corpus.* settings only (the rest are the run's)")
    settings = [f"corpus.{key}={json.dumps(value)}" for key, value in stored["corpus"].items()]
    return load_config(None, settings + list(overrides)).corpus


def _embed(records: list[dict], embed_cfg: EmbedConfig) -> torch.Tensor:
    """The new items' rows as `cart embed` makes them: the run's encoder, L2-normalised. (`minilm-text`
    embeds an item's training texts; a new item's are never validation texts.)"""
    if embed_cfg.encoder == "precomputed":
        raise CartError("embed.encoder=precomputed: the run has no encoder to embed new items with; rebuild the run "
                        "with their embeddings in embed.weights")
    encoder = encoders.load(embed_cfg, pick_device(embed_cfg.device))
    unsupported = [r for r in records if r["modality"] not in encoder.modalities]
    if unsupported:
        raise CartError(f"embed.encoder={embed_cfg.encoder} cannot embed {unsupported[0]['modality']} items "
                        f"(e.g. {unsupported[0]['id']!r})")
    x = F.normalize(encoders.encode_records(encoder, records, embed_cfg.batch_size, "add: embed").float(), dim=-1)
    if not torch.isfinite(x).all():
        raise CartError(f"{embed_cfg.encoder} gave non-finite embeddings for the new items; check their files")
    return x


def _publish(run_dir: Path, records: list[dict], embeddings: torch.Tensor, codes: np.ndarray, ids,
             tensors: dict, what: dict, stage: str, added: list[str]) -> None:
    """Stage the new corpus, embeddings, identifiers and trie with their manifests, then move them in as one
    step. Each manifest names the versions of its file it extends: the model trained on one of them fits.
    The corpus's names every item `cart add` added since `cart corpus` (`added_items`, for `cart train
    --continue`), less those removed."""
    staged = files.staged_folder(run_dir)
    manifests = {name: files.read_manifest(run_dir / name) for name in (files.CORPUS, files.EMBEDDINGS, files.IDS)}

    def manifest(name: str, inputs: dict, **extra) -> str:
        old = manifests[name]
        kept = {k: v for k, v in old.items() if k in ("encoder", "dim", "validation_left_out")}
        written = files.write_manifest(staged / name, stage, old["config"], inputs, **kept, **extra,
                                       recipe={stage: what, "from": old["sha256"]},  # never a stage's own recipe
                                       extends=[*old.get("extends", []), old["sha256"]])
        return written["sha256"]

    content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (staged / files.CORPUS).write_text(content, encoding="utf-8")
    present = {r["id"] for r in records}
    added_items = [i for i in [*manifests[files.CORPUS].get("added_items", []), *added] if i in present]
    corpus_sha = manifest(files.CORPUS, {files.CORPUS + " (before)": manifests[files.CORPUS]["sha256"]},
                          stats=sources.summarize(records), added_items=added_items)
    save_file({"embeddings": embeddings.contiguous()}, str(staged / files.EMBEDDINGS))
    embeddings_sha = manifest(files.EMBEDDINGS, {files.CORPUS: corpus_sha}, items=len(embeddings))

    layout = ids.layout
    trie = PrefixTrie(layout.to_tokens(codes), layout)
    trie.save(staged / files.TRIE)
    summary = json.loads((run_dir / files.IDS_STATS).read_text(encoding="utf-8"))
    built = {k: v for k, v in summary["stats"].items() if k in ("collision_rate", "largest_group", "residual_energy",
                                                                 "reconstruction_error", "relative_reconstruction_error")}
    summary["stats"] = identifiers.code_stats(Codes(codes, layout.level_sizes, stats=built))
    (staged / files.IDS_STATS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    identifiers.plot_codes(summary["stats"], codes, staged / files.IDS_PLOT)
    save_file({**{k: v for k, v in tensors.items() if k not in ("codes", "item_of_key")},
               "codes": torch.from_numpy(codes), "item_of_key": torch.from_numpy(trie.item_of_key)},
              str(staged / files.IDS))
    companions = {name: files.sha256_file(staged / name) for name in (files.TRIE, files.IDS_STATS, files.IDS_PLOT)}
    companions.update({name: sha for name, sha in manifests[files.IDS].get("companions", {}).items()
                       if name not in companions})  # rqvae.safetensors: the same quantiser
    manifest(files.IDS, {files.EMBEDDINGS: embeddings_sha}, companions=companions)
    files.publish_files(run_dir)
