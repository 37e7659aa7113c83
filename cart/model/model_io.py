"""The CART model outside the training loop: a new CartT5 built as the config says (with MiniLM's pretrained
weights, the identifier geometry), its tokenizer, and a trained one loaded back from a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cart import files
from cart.config import Config
from cart.encoders import minilm_dir
from cart.errors import CartError
from cart.index import build_ids
from cart.index.build_ids import Identifiers
from cart.index.identifiers import residual_means
from cart.model.cart_t5 import CartT5, cart_config
from cart.settings import MINILM_DIM


def load(run_dir: Path) -> tuple[CartT5, object, Identifiers]:
    """The trained model (eval mode), its tokenizer and the identifiers it emits; refuses a model trained
    on other identifiers or another corpus (those `cart add` or `cart remove` made of its own will do)."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    _, manifest = files.verified_input(run_dir, files.MODEL_WEIGHTS)
    files.verify_companions(run_dir, manifest, "cart train")
    named = {Path(name).name for name in manifest.get("companions", {})} | {manifest["file"]}
    named.add(files.manifest_path(run_dir / files.MODEL_WEIGHTS).name)
    extra = [p.name for p in (run_dir / files.MODEL).iterdir() if p.name not in named]
    if extra:
        raise CartError(f"{run_dir / files.MODEL / extra[0]} is not one of the files the model was saved with: "
                        f"remove it, or rerun `cart train`")
    ids = fitting_identifiers(run_dir, manifest)
    model = CartT5.from_pretrained(run_dir / files.MODEL, local_files_only=True).eval()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CartError(f"{run_dir / files.MODEL_WEIGHTS} holds NaN or infinite weights: it answers nothing; "
                        f"train again with a lower train.learning_rate")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / files.MODEL, local_files_only=True)
    return model, tokenizer, ids


def require_fitting(run_dir: Path, manifest: dict) -> None:
    """Refuse identifiers (or a corpus) the model of `manifest` was not trained on, unless `cart add` or
    `cart remove` made them of those it was."""
    for name in (files.IDS, files.CORPUS):
        files.require_built_from(manifest, files.MODEL_WEIGHTS, run_dir, name, extended=True)


def fitting_identifiers(run_dir: Path, manifest: dict) -> Identifiers:
    """The run's identifiers, once `require_fitting` has found they fit the model of `manifest`."""
    require_fitting(run_dir, manifest)
    return build_ids.load(run_dir)


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    model_cfg = cfg.model
    source = model_cfg.tokenizer or model_cfg.pretrained or "minilm"
    key = "model.tokenizer" if model_cfg.tokenizer or not model_cfg.pretrained else "model.pretrained"
    folder = minilm_dir() if source == "minilm" else Path(source).expanduser()
    if not folder.is_dir():
        raise CartError(f"{key}: folder not found: {folder}")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CartError(f"{key}: cannot load a tokenizer from {folder}: {str(e).splitlines()[0]}") from None


def build_model(cfg: Config, level_sizes: list[int], text_vocab_size: int,
                geometry: torch.Tensor | None = None) -> CartT5:
    """A CartT5 for the run's identifiers (`level_sizes`, the TokenLayout's) as `model.*` says; `geometry`
    (V, D): the identifier geometry's starting point (`model.geometry`, see `identifier_geometry`)."""
    model_cfg = cfg.model
    if model_cfg.geometry and geometry is None:
        raise ValueError("model.geometry needs the identifier geometry to start from")
    options = _options(cfg, geometry.shape[1] if model_cfg.geometry else 0)
    if model_cfg.pretrained:
        folder = Path(model_cfg.pretrained).expanduser()
        if not (folder / "config.json").exists():
            raise CartError(f"model.pretrained: no T5 config.json in {folder}")
        model = CartT5.from_t5(folder, level_sizes=level_sizes, fusion=model_cfg.fusion, dropout=model_cfg.dropout, **options)
        if model_cfg.geometry:
            model.geometry.data.copy_(geometry)
        return model
    model = CartT5(_built_config(cfg, level_sizes, text_vocab_size, options))
    if model_cfg.encoder == "minilm":  # the whole pretrained encoder, as sentence-transformers loads it
        weights = load_file(str(minilm_dir() / "model.safetensors"))
        missing, _ = model.encoder.bert.load_state_dict({k: v for k, v in weights.items() if not k.startswith("pooler")},
                                                        strict=False)
        if [k for k in missing if "position_ids" not in k]:
            raise CartError(f"MiniLM weights do not fit its BertModel: missing {missing[:3]}")
    elif model_cfg.init_embeddings == "minilm":  # the config checked the tokenizer is MiniLM's
        model.get_input_embeddings().weight.data.copy_(minilm_word_embeddings(model_cfg.d_model))
    if model_cfg.geometry:
        model.geometry.data.copy_(geometry)
    return model


def _options(cfg: Config, geometry_dim: int) -> dict:
    """CartT5's options beyond T5's sizes, as `model.*` says."""
    model_cfg = cfg.model
    return dict(fine_fusion=model_cfg.fine_fusion, level_softmax=model_cfg.level_softmax,
                geometry_scale=model_cfg.geometry_scale, geometry_dim=geometry_dim if model_cfg.geometry else 0)


def _built_config(cfg: Config, level_sizes: list[int], text_vocab_size: int, options: dict):
    """The T5 config of a CartT5 built from `model.*`'s sizes (not from a pretrained T5)."""
    model_cfg = cfg.model
    text_encoder = None
    if model_cfg.encoder == "minilm":  # the config checked d_model and the tokenizer
        text_encoder = json.loads((minilm_dir() / "config.json").read_text(encoding="utf-8"))
    return cart_config(text_vocab_size=text_vocab_size, level_sizes=level_sizes, fusion=model_cfg.fusion, **options,
                       text_encoder=text_encoder, freeze_encoder=model_cfg.freeze_encoder, tune_layers=model_cfg.tune_layers,
                       d_model=model_cfg.d_model, d_kv=model_cfg.d_model // model_cfg.num_heads, d_ff=model_cfg.d_ff,
                       num_layers=model_cfg.num_layers, num_decoder_layers=model_cfg.num_decoder_layers,
                       num_heads=model_cfg.num_heads, dropout_rate=model_cfg.dropout)


def training_bytes(cfg: Config, level_sizes: list[int], text_vocab_size: int, geometry_dim: int) -> int | None:
    """About the memory training's model takes before any batch: its weights, their gradients and AdamW's two
    moments, float32 (counted on torch's meta device, which allocates nothing). None for a pretrained T5,
    whose size its checkpoint already proves."""
    if cfg.model.pretrained:
        return None
    with torch.device("meta"):
        model = CartT5(_built_config(cfg, level_sizes, text_vocab_size, _options(cfg, geometry_dim)))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * (sum(p.numel() for p in model.parameters()) + 3 * trained)


def identifier_geometry(run_dir: Path, ids: Identifiers) -> torch.Tensor:
    """The identifier geometry's starting point: `identifiers.residual_means` of the run's embeddings."""
    path, _ = files.verified_input(run_dir, files.EMBEDDINGS)  # the ids stage checked they are its own
    x = load_file(str(path))["embeddings"].numpy()
    return torch.from_numpy(residual_means(ids.codes, ids.layout, x))


def minilm_word_embeddings(dim: int) -> torch.Tensor:
    """MiniLM's word embeddings (30522 x 384), projected on their top `dim` principal directions when dim
    differs, rescaled to T5's embedding scale (unit RMS per row on average)."""
    weights = load_file(str(minilm_dir() / "model.safetensors"))["embeddings.word_embeddings.weight"].float()
    if dim != MINILM_DIM:
        centred = weights - weights.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        weights = centred @ v[:dim].T if dim <= MINILM_DIM else torch.cat(
            [weights, torch.zeros(len(weights), dim - MINILM_DIM)], dim=1)
    return weights / weights.pow(2).mean().sqrt()
