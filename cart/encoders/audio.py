"""ImageBind's audio input without torchaudio: clips of a file, each a Kaldi filterbank (kaldi-native-fbank's parameters)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from cart.errors import CartError


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
