"""The torch device a setting names ("auto": CUDA when there is one), for every stage that runs a model, the
memory it has free, and the wall time and peak memory of a stage's phases (recorded into its stats file)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from cart.errors import CartError


def pick_device(name: str) -> torch.device:
    """"auto": the process's own GPU under `accelerate launch` (LOCAL_RANK), the first one otherwise, or the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require_memory(need: int | None, device: torch.device, what: str) -> None:
    """Refuse, before allocating it, work that needs more memory than `device` has free (`what` says which
    settings size it)."""
    free = free_memory(device)
    if need is not None and need > free:
        raise CartError(f"{what} needs about {need / 2**30:,.1f} GiB, but {device.type} has {free / 2**30:,.1f} "
                        f"GiB free: lower it")


def _reset_peak() -> None:
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


@contextmanager
def phase(record: dict, name: str):
    _reset_peak()
    start = time.perf_counter()
    yield
    record[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_gb": peak_rss_gb()}
