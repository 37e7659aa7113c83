"""The torch device a setting names ("auto": CUDA when there is one), for every stage that runs a model."""

from __future__ import annotations

import os

import torch


def pick_device(name: str) -> torch.device:
    """"auto": the process's own GPU under `accelerate launch` (LOCAL_RANK), the first one otherwise, or the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)
