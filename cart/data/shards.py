"""Work over many items, split across the processes of `accelerate launch` and saved in shards, so a killed
run resumes and any number of processes gives the same bytes as one.

The items are cut into units of `unit` consecutive items; process p of P computes units p, p + P, ...
and saves each as `<folder>/shard-<unit>.safetensors` (written atomically). When every unit is saved,
the main process reads them back in order and joins them. Each unit is computed alone, from the same
items in the same batches, so neither the number of processes nor where a run was killed changes the
result (on the same hardware with as many threads per process: the thread count changes how floats are
summed). The folder holds a `state.json` of what the shards were made from; shards of another state are
dropped, not mixed in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cart import files


def processes():
    """accelerate's view of the processes (one, when not launched by `accelerate launch`)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines, as training


def map_in_shards(count: int, unit: int, compute: Callable[[int, int], dict[str, torch.Tensor]], folder: Path,
                  state: dict, desc: str) -> dict[str, torch.Tensor] | None:
    """compute(start, stop) -> tensors whose first dimension is the items start..stop-1, for every unit of
    items; the main process gets them joined along the first dimension, the others get None."""
    shared = processes()
    units = range(0, count, unit)
    state = state | {"items": count, "unit": unit}
    if shared.is_main_process:
        _prepare(folder, state)
    shared.wait_for_everyone()
    mine = [(i, start) for i, start in enumerate(units) if i % shared.num_processes == shared.process_index]
    todo = [(i, start) for i, start in mine if not _shard(folder, i).exists()]
    if shared.is_main_process and shared.num_processes > 1:
        print(f"{desc}: {len(units)} shards of {unit} items over {shared.num_processes} processes")
    if shared.is_main_process and len(todo) < len(mine):
        print(f"{desc}: resuming, {len(mine) - len(todo)} of {len(mine)} shards already saved in {folder}")
    size = {i: min(unit, count - start) for i, start in mine}
    with tqdm(total=sum(size.values()), initial=sum(size.values()) - sum(size[i] for i, _ in todo), desc=desc,
              unit=" items", disable=not shared.is_main_process) as bar:
        for i, start in todo:
            tensors = compute(start, start + size[i])
            with files.atomic_path(_shard(folder, i)) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            bar.update(size[i])
    shared.wait_for_everyone()
    if not shared.is_main_process:
        return None
    parts = [load_file(str(_shard(folder, i))) for i in range(len(units))]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}


def _prepare(folder: Path, state: dict) -> None:
    """Keep the folder's shards if they were made from `state`, else start it afresh."""
    state_file = folder / "state.json"
    if state_file.exists() and json.loads(state_file.read_text(encoding="utf-8")) == json.loads(json.dumps(state)):
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files.write_text(state_file, json.dumps(state, sort_keys=True))


def _shard(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:06d}.safetensors"


def texts_to_tensors(texts: list[str]) -> dict[str, torch.Tensor]:
    """Strings as tensors a shard can hold: their UTF-8 bytes end to end, and each one's length in bytes."""
    encoded = [t.encode("utf-8") for t in texts]
    return {"text_bytes": torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()),
            "text_lengths": torch.tensor([len(b) for b in encoded], dtype=torch.int64)}


def tensors_to_texts(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The inverse of `texts_to_tensors`, also for shards joined end to end."""
    data = tensors["text_bytes"].numpy().tobytes()
    ends = tensors["text_lengths"].cumsum(0).tolist()
    return [data[start:end].decode("utf-8") for start, end in zip([0] + ends[:-1], ends)]
