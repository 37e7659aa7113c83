"""Encoders that turn corpus items into embeddings, and the `cart embed` stage that runs them (`embed.py`):
EfficientNet-Lite0 (`efficientnet.py`), MiniLM on an item's text (`text.py`), ImageBind (`imagebind.py`, its
audio and video inputs in `audio.py` and `video.py`), or a precomputed file.

An encoder has `dim`, `modalities` and `encode(records) -> (B, D) float32 tensor`; MiniLM and ImageBind
also have `encode_text(texts)`. Weights always come from a local file: nothing here downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cart.encoders.audio import audio_clips, clip_starts, kaldi_fbank
from cart.encoders.efficientnet import EfficientNetLite0
from cart.encoders.imagebind import ImageBind
from cart.encoders.text import ItemText, minilm_dir, minilm_sentence_model
from cart.encoders.video import video_clips
from cart.errors import CartError
from cart.settings import EmbedConfig

__all__ = ["EfficientNetLite0", "ImageBind", "ItemText", "audio_clips", "clip_starts", "encode_records", "kaldi_fbank", "load",
           "load_precomputed", "minilm_dir", "minilm_sentence_model", "query_encoder", "video_clips"]


def load(cfg: EmbedConfig, device: torch.device):
    if cfg.encoder == "efficientnet-lite0":
        return EfficientNetLite0(device)
    if cfg.encoder == "minilm-text":
        return ItemText(device)
    if cfg.encoder == "imagebind":
        return ImageBind(cfg.weights, cfg.imagebind_arch, device)
    raise CartError(f"embed.encoder={cfg.encoder} is not a model; precomputed embeddings are read by load_precomputed")


def encode_records(encoder, records: list[dict], batch_size: int, progress: str | None = None) -> torch.Tensor:
    """(N, D) float32 rows of `records`, `batch_size` at a time (a tqdm bar named `progress`); a batch the
    encoder cannot read is a one-line error naming its first item."""
    from tqdm import tqdm

    rows = []
    for at in tqdm(range(0, len(records), batch_size), desc=progress, unit=" batches", leave=False, disable=progress is None):
        batch = records[at: at + batch_size]
        try:
            rows.append(encoder.encode(batch))
        except (OSError, ValueError) as err:
            raise CartError(f"embed: item {batch[0]['id']!r} batch failed: {err}") from None
    return torch.cat(rows)


def query_encoder(cfg: EmbedConfig, device: torch.device):
    """The text side of the run's item encoder (`encode_text`): MiniLM for `minilm-text`, ImageBind's text
    tower for `imagebind`; the others embed no text."""
    if cfg.encoder not in ("minilm-text", "imagebind"):
        raise CartError(f"embed.encoder={cfg.encoder} has no text side to embed queries with (minilm-text and "
                        f"imagebind have)")
    return load(cfg, device)


def load_precomputed(path: str, ids: list[str]) -> torch.Tensor:
    """Rows of a .npy or .safetensors file in corpus order.

    A .safetensors file holds an `embeddings` tensor and, in its metadata, `ids` (a JSON list): rows are
    matched by id. A .npy file is matched by a `<name>.ids.txt` beside it (one id a line) when there is
    one, otherwise it must have one row per corpus item, in corpus order.
    """
    file = Path(path).expanduser()
    if not path or not file.is_file():
        raise CartError(f"embed.weights: precomputed embeddings file not found: {path or '(empty)'}")
    file_ids = None
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            if "embeddings" not in f.keys():
                raise CartError(f"{file}: no tensor named 'embeddings' (found {', '.join(f.keys())})")
            matrix = f.get_tensor("embeddings")
            metadata = f.metadata() or {}
        file_ids = json.loads(metadata["ids"]) if "ids" in metadata else None
    elif file.suffix == ".npy":
        try:
            array = np.load(file)
        except (ValueError, OSError) as e:  # object arrays (allow_pickle is off), a file that is not .npy
            raise CartError(f"{file}: cannot read it as a NumPy array: {str(e).splitlines()[0]}") from None
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise CartError(f"{file}: holds {array.dtype} values; embeddings are real numbers")
        matrix = torch.from_numpy(array)
        sidecar = file.with_suffix(".ids.txt")
        if sidecar.exists():
            file_ids = sidecar.read_text(encoding="utf-8").split("\n")
            file_ids = [i for i in file_ids if i]
    else:
        raise CartError(f"{file}: precomputed embeddings must be .npy or .safetensors")
    if matrix.ndim != 2:
        raise CartError(f"{file}: expected an N x D matrix, got shape {tuple(matrix.shape)}")
    if file_ids is None:
        if len(matrix) != len(ids):
            raise CartError(f"{file}: {len(matrix)} rows but the corpus has {len(ids)} items (and no ids to match)")
        return matrix.float()
    if len(file_ids) != len(matrix):
        raise CartError(f"{file}: {len(file_ids)} ids for {len(matrix)} rows")
    row = {item_id: i for i, item_id in enumerate(file_ids)}
    missing = [i for i in ids if i not in row]
    if missing:
        raise CartError(f"{file}: no embedding for {len(missing)} corpus items, e.g. {missing[0]!r}")
    return matrix[[row[i] for i in ids]].float()
