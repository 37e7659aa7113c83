"""Stage `cart caption`: caption enhancement, generated captions as extra training texts.

Reads `corpus.jsonl` and an image-to-text model from a local folder (`caption.model`, e.g. BLIP, loaded by
transformers' image-text-to-text pipeline). Writes `captions.jsonl`, one line per image item:
`{"id": ..., "captions": [...]}`. It is a file of its own (not appended to the corpus) so the
embeddings and identifiers built from the corpus stay valid; `cart train` reads it when present.
Under `accelerate launch` the images are split over the processes and saved in shards
(`captions.partial/`, see `cart/data/shards.py`), so a killed run resumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cart import files
from cart.config import Config, to_dict
from cart.data import corpus, shards
from cart.data.images import load_rgb
from cart.devices import pick_device
from cart.errors import CartError


def run(cfg: Config, force: bool = False) -> Path:
    """Caption every image of the run's corpus; return the path of `captions.jsonl`. Captions of the same
    corpus and settings are kept; other ones a model was trained on are replaced only with `force`."""
    caption_cfg = cfg.caption
    records = [r for r in corpus.read(cfg.run_dir) if r["modality"] == "image"]
    _, corpus_manifest = files.verified_input(cfg.run_dir, files.CORPUS)
    if not records:
        raise CartError(f"{cfg.run_dir / files.CORPUS}: no image items to caption")
    captioner_folder(caption_cfg.model)
    settings = {k: v for k, v in to_dict(cfg)["caption"].items() if k not in ("batch_size", "device", "save_every")}
    recipe = {"corpus": corpus_manifest["sha256"], "caption": settings}
    out = cfg.run_dir / files.CAPTIONS
    if files.check_replace(cfg.run_dir, files.CAPTIONS, recipe, force):
        print(f"caption: {out} is up to date (the same corpus and caption settings; --force captions again)")
        return out
    captioner = load_captioner(caption_cfg.model, caption_cfg.device)

    def caption(start: int, stop: int) -> dict:
        lines = []
        for at in range(start, stop, caption_cfg.batch_size):
            batch = records[at: min(at + caption_cfg.batch_size, stop)]
            images = [load_rgb(r["path"]) for r in batch]  # transparent pixels on white, as embedding sees them
            outputs = captioner(images=images, text=[caption_cfg.prompt] * len(images), batch_size=len(images),
                                return_full_text=False,
                                generate_kwargs={"max_new_tokens": caption_cfg.max_new_tokens,
                                                 "num_beams": max(caption_cfg.per_item, 1),
                                                 "num_return_sequences": caption_cfg.per_item})
            for record, generated in zip(batch, outputs):
                generated = generated if isinstance(generated, list) else [generated]
                captions = list(dict.fromkeys(g["generated_text"].strip() for g in generated))
                lines.append(json.dumps({"id": record["id"], "captions": [x for x in captions if x]},
                                        ensure_ascii=False) + "\n")
        return shards.texts_to_tensors(lines)

    state = {"corpus": corpus_manifest["sha256"], "caption": to_dict(cfg)["caption"]}
    joined = shards.map_in_shards(len(records), caption_cfg.batch_size * caption_cfg.save_every, caption,
                                  cfg.run_dir / files.CAPTIONS_PARTIAL, state, "caption")
    if joined is None:  # another process of `accelerate launch`: the main one writes
        return out
    lines = shards.tensors_to_texts(joined)
    files.write_text(out, "".join(lines))
    files.write_manifest(out, "caption", to_dict(cfg), {files.CORPUS: corpus_manifest["sha256"]}, recipe=recipe,
                         items=len(lines))
    shutil.rmtree(cfg.run_dir / files.CAPTIONS_PARTIAL, ignore_errors=True)
    print(f"caption: {len(lines)} images captioned with {caption_cfg.model} -> {out}")
    return out


def captioner_folder(folder: str) -> Path:
    """The local model folder `caption.model` names, refusing one without a model config."""
    path = Path(folder).expanduser() if folder else None
    if path is None or not (path / "config.json").exists():
        raise CartError(f"caption.model: no model config.json in {folder or '(not set)'}: give a local "
                        f"image-to-text model folder (e.g. a BLIP captioning model)")
    return path


def load_captioner(folder: str, device: str):
    from transformers import pipeline

    path = captioner_folder(folder)
    try:
        return pipeline("image-text-to-text", model=str(path), device=pick_device(device), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CartError(f"caption.model: cannot load an image-to-text model from {path}: {str(e).splitlines()[0]}") from None
