"""Meta's ImageBind: its model code imported around its package's broken __init__, weights from a local checkpoint."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import transforms

from cart.data.images import load_rgb
from cart.encoders.audio import audio_clips
from cart.encoders.video import CLIP_MEAN, CLIP_STD, video_clips
from cart.errors import CartError

# imagebind_huge() in Meta's code; an empty `embed.imagebind_arch` means these.
IMAGEBIND_HUGE = dict(
    vision_embed_dim=1280, vision_num_blocks=32, vision_num_heads=16,
    text_embed_dim=1024, text_num_blocks=24, text_num_heads=16,
    out_embed_dim=1024, audio_drop_path=0.1, imu_drop_path=0.7,
)


def _imagebind_package():
    """Meta's ImageBind model code from PyPI `imagebind-unofficial`, imported without its package __init__.

    That __init__ imports `imagebind.data`, which needs pkg_resources (gone from setuptools >= 81),
    torchaudio (no build for our torch) and pytorchvideo 0.1.5 (it imports a torchvision module removed
    years ago). The model modules need none of these. So the real package is registered from its spec
    without running __init__ (module_from_spec does not execute it), and the model modules import
    normally; preprocessing is done below with torchvision, kaldi-native-fbank and PyAV instead of
    `imagebind.data`, matching its parameters.
    """
    if "imagebind" not in sys.modules:
        spec = importlib.util.find_spec("imagebind")
        if spec is None or spec.submodule_search_locations is None:
            raise CartError(
                "the imagebind encoder needs Meta's model code: pip install 'cart[imagebind]' "
                "&& pip install --no-deps imagebind-unofficial==0.1.1"
            )
        sys.modules["imagebind"] = importlib.util.module_from_spec(spec)
    model = importlib.import_module("imagebind.models.imagebind_model")
    preprocessors = importlib.import_module("imagebind.models.multimodal_preprocessors")
    bpe = Path(sys.modules["imagebind"].__path__[0]) / "bpe" / "bpe_simple_vocab_16e6.txt.gz"
    return model, preprocessors.SimpleTokenizer(bpe_path=str(bpe))


class ImageBind:
    """Meta's ImageBind, weights from the official checkpoint at a local path; vision, text, audio, video.

    Outputs are L2-normalised: ImageBind normalises vision only, scales audio by 20 and text by a learned
    logit scale, and a video's clip embeddings are averaged.
    """

    modalities = ("image", "audio", "video")

    def __init__(self, weights: str, arch: dict, device: torch.device):
        imagebind_model, self.tokenizer = _imagebind_package()
        if not weights:
            raise CartError("embed.weights: give the path of ImageBind's checkpoint (imagebind_huge.pth)")
        if not Path(weights).expanduser().is_file():
            raise CartError(f"embed.weights: ImageBind checkpoint not found: {weights}")
        kwargs = arch or IMAGEBIND_HUGE
        try:
            model = imagebind_model.ImageBindModel(**kwargs)
        except TypeError as e:
            raise CartError(f"embed.imagebind_arch: {e}") from None
        state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise CartError(f"{weights}: does not fit ImageBindModel({kwargs or 'huge'}): {first}") from None
        self.model = model.eval().to(device)
        self.device = device
        self.dim = kwargs.get("out_embed_dim", 768)
        self.audio_bins = kwargs.get("audio_num_mel_bins", 128)
        self.audio_frames = kwargs.get("audio_target_len", 204)
        self.vision = transforms.Compose([
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ])

    @torch.inference_mode()
    def encode(self, records: list[dict]) -> torch.Tensor:
        out = torch.empty(len(records), self.dim)
        for modality, key, prepare in (
            ("image", "vision", lambda r: self.vision(load_rgb(r["path"]))),
            ("audio", "audio", lambda r: audio_clips(r["path"], self.audio_bins, self.audio_frames)),
            ("video", "vision", lambda r: video_clips(r["path"])),
        ):
            rows = [i for i, r in enumerate(records) if r["modality"] == modality]
            if rows:
                batch = torch.stack([prepare(records[i]) for i in rows]).to(self.device)
                out[rows] = self.model({key: batch})[key].float().cpu()
        return F.normalize(out, dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = torch.stack([self.tokenizer(t) for t in texts]).to(self.device)  # (B, 77)
        return F.normalize(self.model({"text": tokens})["text"].float().cpu(), dim=-1)
