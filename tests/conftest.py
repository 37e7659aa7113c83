"""Shared fixtures: tiny media made in code, and the tiny config pointed at a temporary run folder."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from cart.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/fixtures"  # files a test compares against
# the tiny media are drawn by the script that makes configs/tiny.yaml's input: one copy of them
_spec = importlib.util.spec_from_file_location("make_tiny_data", ROOT / "scripts/make_tiny_data.py")
tiny_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_data)
COLOURS, make_image, make_media = tiny_data.COLOURS, tiny_data.make_image, tiny_data.make_media
# A tiny ImageBind: every tower one block of width 16; the same class and loading code as imagebind_huge.
TINY_IMAGEBIND = {
    f"{m}_{k}": v for m in ("vision", "audio", "text", "depth", "thermal", "imu")
    for k, v in (("embed_dim", 16), ("num_blocks", 1), ("num_heads", 2))
} | {"out_embed_dim": 8}


@pytest.fixture
def media(tmp_path) -> Path:
    return make_media(tmp_path)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def manifest(tmp_path, media) -> Path:
    return write_jsonl(tmp_path / "manifest.jsonl", tiny_data.manifest_rows())


@pytest.fixture
def tiny_config(tmp_path):
    """configs/tiny.yaml with its outputs under tmp_path; extra overrides as key=value strings."""

    def load(*overrides: str):
        return load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path / 'runs'}", *overrides])

    return load


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as each process `launch_two_processes` starts: the thread count changes how
    floats are summed, so byte-for-byte comparisons need the same."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def launch_two_processes(*cart_args: str, port: int) -> subprocess.CompletedProcess:
    """`accelerate launch -m cart ...` with 2 gloo processes on the CPU of one thread each, as a multi-GPU run
    would go."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--num_cpu_threads_per_process", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "cart", *cart_args]
    return subprocess.run(launch, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "ACCELERATE_USE_CPU": "true"})


def unit_rows(matrix) -> bool:
    return bool(np.allclose(np.linalg.norm(np.asarray(matrix), axis=1), 1.0, atol=1e-5))


def dead_pid() -> int:
    """The PID of a process that has ended (what a kill -9 leaves behind in a temporary's name)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def silent_wav(path: Path) -> Path:
    """A WAV file of 10 ms of silence (16 kHz, 16-bit mono)."""
    with wave.open(str(path), "wb") as clip:
        clip.setnchannels(1), clip.setsampwidth(2), clip.setframerate(16000), clip.writeframes(b"\0\0" * 160)
    return path


def prepare_run(root: Path, modality: str = "image"):
    """A run ready for `cart train` under root: corpus (12 items, 3 training texts each, 2 held-out items),
    random precomputed embeddings, ids. Returns config(*overrides) for it; config.overrides holds its own.
    `modality`: what the items are, image or audio (a short silent WAV each: the embeddings are precomputed)."""
    from cart.data import corpus
    from cart.encoders import embed
    from cart.index import build_ids

    make_media(root)
    if modality == "audio":
        for i in range(6):
            silent_wav(root / f"media/img{i}.wav")
    suffix = {"image": "png", "audio": "wav"}[modality]
    rows = [{"id": f"item{i}", "modality": modality, "path": f"media/img{i % 6}.{suffix}",
             "texts": [f"{c} number {i}", f"shape {i}", f"{c} thing {i // 2}"], "split": "test" if i >= 10 else "train"}
            for i, c in enumerate(COLOURS * 2)]
    manifest = write_jsonl(root / "manifest.jsonl", rows)
    np.save(root / "emb.npy", np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32))
    overrides = [f"output_dir={root / 'runs'}", f"corpus.path={manifest}", "embed.encoder=precomputed",
                 f"embed.weights={root / 'emb.npy'}", "ids.clusters=3"]

    def config(*extra):
        return load_config(ROOT / "configs/tiny.yaml", [*overrides, *extra])

    cfg = config()
    corpus.run(cfg)
    embed.run(cfg)
    build_ids.run(cfg)
    config.overrides = overrides
    return config


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny trained run (prepare_run + `cart train`) shared by the retrieval and generation tests."""
    from cart import train

    config = prepare_run(tmp_path_factory.mktemp("trained"))
    train.run(config())
    return config


@pytest.fixture(scope="session")
def reranked(tmp_path_factory):
    """A tiny run whose identifiers come from item text (MiniLM), trained with retrieve.rerank: a function of
    overrides giving its config. Shared by the retrieval, eval and training tests."""
    from cart import train
    from cart.data import corpus
    from cart.encoders import embed
    from cart.index import build_ids

    root = tmp_path_factory.mktemp("rerank")
    make_media(root)
    rows = [{"id": f"item{i}", "path": f"media/img{i % 6}.png",
             "texts": [f"{c} number {i}", f"shape {i}", f"{c} thing {i // 2}",
                       {"text": f"a {c} shape {i}", "kind": "query", "set": "A"},
                       {"text": f"{c} item {i}", "kind": "validation"}]}
            for i, c in enumerate(COLOURS * 2)]
    overrides = [f"output_dir={root / 'runs'}", f"corpus.path={write_jsonl(root / 'm.jsonl', rows)}",
                 "embed.encoder=minilm-text", "ids.clusters=3", "retrieve.rerank=true", "eval.baselines=[]"]

    def config(*extra):
        from cart.config import load_config
        return load_config(ROOT / "configs/tiny.yaml", [*overrides, *extra])

    cfg = config()
    for stage in (corpus, embed, build_ids, train):
        stage.run(cfg)
    return config
