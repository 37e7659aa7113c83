"""ImageBind's video input without pytorchvideo: clips of frames decoded by PyAV, scaled, normalised, cropped."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cart.encoders.audio import clip_starts
from cart.errors import CartError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
