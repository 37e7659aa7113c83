"""Stage `cart embed`: embed every corpus item once.

Reads `corpus.jsonl`; writes `embeddings.safetensors` (tensor `embeddings`, N x D
float32, one L2-normalised row per item in corpus order) and its manifest.
Under `accelerate launch` the items are split over the processes (`cart/data/shards.py`); work is saved
every `embed.save_every` batches to `embeddings.partial/`, so an interrupted run picks up where it
stopped, and the result is the same bytes for any number of processes. The partial folder is kept only
while it belongs to the same corpus, encoder settings and batches. `minilm-text` embeds an
item's training text without the texts `cart train` will hold out for validation
(`pairs.held_out_texts`), so identifiers built from it know nothing validation asks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cart import encoders, files
from cart.config import Config, to_dict
from cart.data import corpus, pairs, shards
from cart.devices import pick_device
from cart.errors import CartError


def run(cfg: Config, force: bool = False) -> Path:
    """Write `embeddings.safetensors` for the run's corpus; return its path. Embeddings of the same corpus
    and settings are kept; other ones that later stages were built from are replaced only with `force`."""
    run_dir, embed_cfg = cfg.run_dir, cfg.embed
    records = corpus.read(run_dir)
    _, corpus_manifest = files.verified_input(run_dir, files.CORPUS)
    out = run_dir / files.EMBEDDINGS
    extra = {}
    if embed_cfg.encoder == "minilm-text":  # the item's own text: never the texts `cart train` validates on
        held_out = pairs.held_out_texts(records, cfg)
        records = pairs.without_texts(records, held_out)
        extra["validation_left_out"] = pairs.held_out_digest(held_out)
    made_from = recipe(cfg, corpus_manifest["sha256"], extra)
    if files.check_replace(run_dir, files.EMBEDDINGS, made_from, force):
        print(f"embed: {out} is up to date (the same corpus and embed settings; --force computes it again)")
        return out
    if embed_cfg.encoder == "precomputed":
        matrix = encoders.load_precomputed(embed_cfg.weights, [r["id"] for r in records])
    else:
        matrix = _encode(records, cfg, corpus_manifest["sha256"], extra)
    if matrix is None or not shards.processes().is_main_process:  # under `accelerate launch`, the main one writes
        return out
    matrix = F.normalize(matrix.float(), dim=-1).contiguous()
    if not torch.isfinite(matrix).all():
        raise CartError(f"{embed_cfg.encoder} gave non-finite embeddings; check the inputs and weights")
    with files.atomic_path(out) as tmp:
        save_file({"embeddings": matrix}, str(tmp))
    files.write_manifest(
        out, "embed", to_dict(cfg), {files.CORPUS: corpus_manifest["sha256"]},
        recipe=made_from,
        encoder=embed_cfg.encoder, items=len(matrix), dim=matrix.shape[1], **extra,
    )
    shutil.rmtree(run_dir / files.EMBEDDINGS_PARTIAL, ignore_errors=True)
    print(f"embed: {len(matrix)} x {matrix.shape[1]} ({embed_cfg.encoder}) -> {out}")
    return out


def recipe(cfg: Config, corpus_sha: str, extra: dict) -> dict:
    """What decides the embeddings: the corpus, the encoder and its weights (not the batch size, device or
    save frequency)."""
    settings = {k: v for k, v in to_dict(cfg)["embed"].items() if k not in ("batch_size", "device", "save_every")}
    weights = Path(cfg.embed.weights).expanduser()
    return {"corpus": corpus_sha, "embed": settings, **extra,
            "weights_sha256": files.sha256_file(weights) if cfg.embed.weights and weights.is_file() else None}


def _encode(records: list[dict], cfg: Config, corpus_sha: str, extra: dict) -> torch.Tensor | None:
    """The rows of every item, on the main process (None on the others of `accelerate launch`)."""
    embed_cfg = cfg.embed
    encoder = encoders.load(embed_cfg, pick_device(embed_cfg.device))
    unsupported = [r for r in records if r["modality"] not in encoder.modalities]
    if unsupported:
        r = unsupported[0]
        raise CartError(
            f"embed.encoder={embed_cfg.encoder} cannot embed {r['modality']} items "
            f"({len(unsupported)} in the corpus, e.g. {r['id']!r}); use imagebind"
        )

    def encode(start: int, stop: int) -> dict[str, torch.Tensor]:
        return {"rows": encoders.encode_records(encoder, records[start: stop], embed_cfg.batch_size)}

    # shards stay valid while the corpus, the model and the batches are the same (the device does not matter)
    state = {"corpus": corpus_sha, "encoder": embed_cfg.encoder, "weights": embed_cfg.weights,
             "arch": embed_cfg.imagebind_arch, **extra}
    joined = shards.map_in_shards(len(records), embed_cfg.batch_size * embed_cfg.save_every, encode,
                                  cfg.run_dir / files.EMBEDDINGS_PARTIAL, state, f"embed ({embed_cfg.encoder})")
    return None if joined is None else joined["rows"]
