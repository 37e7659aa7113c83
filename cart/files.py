"""The run folder: file names, atomic writes, manifests and freshness checks.

Stages talk only through files in `checkpoints/<run>/`. Each file `X.ext` has a
manifest `X.manifest.json` beside it: the stage that wrote it, the file's
sha256, the sha256 of every input it was built from, the resolved config and
the package version. A stage refuses an input whose own manifest does not
match it (edited or half-written) and an output built from other inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from cart import __version__
from cart.errors import CartError

CORPUS = "corpus.jsonl"
EMBEDDINGS = "embeddings.safetensors"
EMBEDDINGS_PARTIAL = "embeddings.partial"  # resumable shards while `cart embed` runs
IDS = "ids.safetensors"  # codes (N x L), the trie's key -> item table, K-Means centroids
IDS_STATS = "ids.json"
IDS_PLOT = "ids.png"
RQVAE = "rqvae.safetensors"
TRIE = "trie.marisa"
CAPTIONS = "captions.jsonl"  # generated captions, extra training texts (`cart caption`)
MODEL = "model"  # CartT5 + tokenizer (save_pretrained)
MODEL_WEIGHTS = "model/model.safetensors"
STATE = "state"  # resumable training states, state/step_N/
VALIDATION = "validation.jsonl"  # the validation pairs carved from the training texts
TRAIN_LOG = "train.json"
EVAL = "eval.json"  # metrics of CART and the baselines per held-out query set
HITS = "hits.jsonl"  # per query: each method's ranked items and the rank of the first right one
REPORT = "report.html"

# Which command writes each file, for "run X first" messages.
WRITER = {CORPUS: "cart corpus", EMBEDDINGS: "cart embed", IDS: "cart ids", CAPTIONS: "cart caption",
          MODEL_WEIGHTS: "cart train"}


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.split(".")[0] + ".manifest.json")


def write_manifest(path: Path, stage: str, config: dict, inputs: dict[str, str], **extra) -> dict:
    """Record what `path` is and what it was built from (`inputs`: file name -> sha256)."""
    manifest = {
        "stage": stage,
        "file": Path(path).name,
        "sha256": sha256_file(path),
        "inputs": inputs,
        "config": config,
        "cart_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    write_text(manifest_path(path), json.dumps(manifest, indent=2) + "\n")
    return manifest


def verified_input(run_dir: Path, name: str) -> tuple[Path, dict]:
    """Return a stage output and its manifest, refusing one that is missing or does not match its manifest."""
    path = Path(run_dir) / name
    if not path.exists():
        raise CartError(f"{path} is missing: run `{WRITER.get(name, 'the stage that writes it')}` first")
    try:
        manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        raise CartError(f"{manifest_path(path)} is missing or unreadable: rerun `{WRITER.get(name)}`") from None
    if manifest.get("sha256") != sha256_file(path):
        raise CartError(f"{path} does not match its manifest (edited by hand?): rerun `{WRITER.get(name)}`")
    return path, manifest


def require_built_from(output: dict, output_name: str, run_dir: Path, input_name: str) -> None:
    """Refuse a stage output (its manifest `output`) built from another version of `input_name`."""
    _, current = verified_input(run_dir, input_name)
    if output["inputs"].get(input_name) != current["sha256"]:
        raise CartError(
            f"{Path(run_dir) / output_name} was built from another {input_name}: "
            f"rerun `{WRITER.get(output_name)}`"
        )
