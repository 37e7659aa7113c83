"""Wall time and peak memory of the phases of a stage, recorded into a dict for its stats file."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path


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
