"""Stage `cart embed`: embed every corpus item once.

Reads `corpus.jsonl`; writes `embeddings.safetensors` (tensor `embeddings`, N x D
float32, one L2-normalised row per item in corpus order) and its manifest.
Work is saved every `embed.save_every` batches to `embeddings.partial/`, so an
interrupted run picks up where it stopped; the partial folder is kept only
while it belongs to the same corpus and encoder settings. `minilm-text` embeds an
item's training text without the texts `cart train` will hold out for validation
(`data.held_out_texts`), so identifiers built from it know nothing validation asks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cart import corpus, data, encoders, files
from cart.config import Config, to_dict
from cart.devices import pick_device
from cart.errors import CartError


def run(cfg: Config) -> Path:
    """Write `embeddings.safetensors` for the run's corpus; return its path."""
    run_dir, embed_cfg = cfg.run_dir, cfg.embed
    records = corpus.read(run_dir)
    _, corpus_manifest = files.verified_input(run_dir, files.CORPUS)
    out = run_dir / files.EMBEDDINGS
    extra = {}
    if embed_cfg.encoder == "minilm-text":  # the item's own text: never the texts `cart train` validates on
        held_out = data.held_out_texts(records, cfg)
        records = data.without_texts(records, held_out)
        extra["validation_left_out"] = data.held_out_digest(held_out)
    if embed_cfg.encoder == "precomputed":
        matrix = encoders.load_precomputed(embed_cfg.weights, [r["id"] for r in records])
    else:
        matrix = _encode(records, cfg, corpus_manifest["sha256"], extra)
    matrix = F.normalize(matrix.float(), dim=-1).contiguous()
    if not torch.isfinite(matrix).all():
        raise CartError(f"{embed_cfg.encoder} gave non-finite embeddings; check the inputs and weights")
    with files.atomic_path(out) as tmp:
        save_file({"embeddings": matrix}, str(tmp))
    files.write_manifest(
        out, "embed", to_dict(cfg), {files.CORPUS: corpus_manifest["sha256"]},
        encoder=embed_cfg.encoder, items=len(matrix), dim=matrix.shape[1], **extra,
    )
    shutil.rmtree(run_dir / files.EMBEDDINGS_PARTIAL, ignore_errors=True)
    print(f"embed: {len(matrix)} x {matrix.shape[1]} ({embed_cfg.encoder}) -> {out}")
    return out


def _encode(records: list[dict], cfg: Config, corpus_sha: str, extra: dict) -> torch.Tensor:
    embed_cfg = cfg.embed
    encoder = encoders.load(embed_cfg, pick_device(embed_cfg.device))
    unsupported = [r for r in records if r["modality"] not in encoder.modalities]
    if unsupported:
        r = unsupported[0]
        raise CartError(
            f"embed.encoder={embed_cfg.encoder} cannot embed {r['modality']} items "
            f"({len(unsupported)} in the corpus, e.g. {r['id']!r}); use imagebind"
        )
    partial = cfg.run_dir / files.EMBEDDINGS_PARTIAL
    # Shards stay valid while the corpus and the model are the same (batch size and device do not matter).
    done = _resume(partial, {"corpus": corpus_sha, "encoder": embed_cfg.encoder, "weights": embed_cfg.weights,
                             "arch": embed_cfg.imagebind_arch, **extra})
    rows = sum(len(t) for t in done)
    pending: list[torch.Tensor] = []
    with tqdm(total=len(records), initial=rows, desc=f"embed ({embed_cfg.encoder})", unit=" items") as bar:
        for start in range(rows, len(records), embed_cfg.batch_size):
            batch = records[start: start + embed_cfg.batch_size]
            try:
                pending.append(encoder.encode(batch))
            except (OSError, ValueError) as err:
                raise CartError(f"embed: item {batch[0]['id']!r} batch failed: {err}") from None
            bar.update(len(batch))
            if len(pending) == embed_cfg.save_every:
                done.append(_save_shard(partial, len(done), torch.cat(pending)))
                pending = []
    return torch.cat(done + pending)


def _resume(partial: Path, state: dict) -> list[torch.Tensor]:
    """Shards already written by an interrupted run with the same inputs; otherwise start afresh."""
    state_file = partial / "state.json"
    if state_file.exists() and json.loads(state_file.read_text(encoding="utf-8")) == state:
        shards = sorted(partial.glob("shard-*.safetensors"))
        if shards:
            print(f"embed: resuming after {len(shards)} saved shards in {partial}")
        return [load_file(str(s))["rows"] for s in shards]
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files.write_text(state_file, json.dumps(state, sort_keys=True))
    return []


def _save_shard(partial: Path, index: int, rows: torch.Tensor) -> torch.Tensor:
    with files.atomic_path(partial / f"shard-{index:06d}.safetensors") as tmp:
        save_file({"rows": rows.contiguous()}, str(tmp))
    return rows
