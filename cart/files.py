"""The run folder: file names, atomic writes, manifests and freshness checks.

Stages talk only through files in `checkpoints/<run>/`. Each file `X.ext` has a
manifest `X.manifest.json` beside it: the stage that wrote it, the file's
sha256, the sha256 of every input it was built from, the resolved config and
the package version. A stage refuses an input whose own manifest does not
match it (edited or half-written) and an output built from other inputs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
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
CAPTIONS_PARTIAL = "captions.partial"  # resumable shards while `cart caption` runs
MODEL = "model"  # CartT5 + tokenizer (save_pretrained)
MODEL_WEIGHTS = "model/model.safetensors"
STATE = "state"  # resumable training states, state/step_N/
VALIDATION = "validation.jsonl"  # the validation pairs carved from the training texts
TRAIN_LOG = "train.json"
EVAL = "eval.json"  # metrics of CART and the baselines per held-out query set
HITS = "hits.jsonl"  # per query: each method's ranked items and the rank of the first right one
EVAL_PARTIAL = "eval.partial"  # resumable shards of each method's rankings while `cart eval` runs
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


def staging_folder(path: Path) -> Path:
    """Where a new version of the folder `path` is written before `publish_folder` swaps it in: a hidden
    temporary beside it (what a kill left there is the caller's to clear)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def publish_folder(folder: Path, path: Path) -> None:
    """Make the complete `folder` (a temporary beside `path`) become `path` in one atomic step. `path` is a
    symlink to a hidden folder `.<name>.<n>`, so replacing it swaps one link (os.replace): a reader, or a
    kill at any moment, finds the old folder or the new one, never half of one. (A plain `path` folder, as
    an older cart wrote it, is moved aside first: a kill just then leaves no `path` until `finish_publish`.)
    The old folder and any temporaries an earlier kill left are removed afterwards."""
    folder, path = Path(folder), Path(path)
    finish_publish(path)
    version = path.with_name(f".{path.name}.{time.time_ns()}")
    os.replace(folder, version)
    link = path.with_name(f".{path.name}.link")
    link.unlink(missing_ok=True)
    os.symlink(version.name, link)
    if path.is_dir() and not path.is_symlink():  # a plain folder (an older cart's): moved aside, then removed
        os.replace(path, path.with_name(f".{path.name}.old"))
    os.replace(link, path)
    remove_stale(path.parent, f".{glob.escape(path.name)}.*")


def finish_publish(path: Path) -> None:
    """Complete a `publish_folder` that a kill interrupted before `path` existed again: the link made for
    it, or the folder an older cart's plain `path` was moved aside to, becomes `path`."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return
    link, old = path.with_name(f".{path.name}.link"), path.with_name(f".{path.name}.old")
    if link.is_symlink() and (path.parent / os.readlink(link)).is_dir():
        os.replace(link, path)
    elif old.is_dir():
        os.replace(old, path)


def remove_stale(folder: Path, pattern: str) -> None:
    """Remove the hidden entries of `folder` matching `pattern` (e.g. ".model.*") that no link of `folder`
    points at: the versions `publish_folder` replaced and the temporaries of a write that was killed."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    current = {os.readlink(p) for p in folder.iterdir() if p.is_symlink() and not p.name.startswith(".")}
    for entry in folder.glob(pattern):
        if entry.name in current:
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def remove_folder(path: Path) -> None:
    """Remove a folder, or a link made by `publish_folder` and the folder it points at."""
    path = Path(path)
    if path.is_symlink():
        target = path.parent / os.readlink(path)
        path.unlink()
        shutil.rmtree(target, ignore_errors=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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


def folder_hashes(folder: Path, name: str, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file in `folder` (to be published as `name` in the run folder), keyed `name/file`."""
    return {f"{name}/{p.name}": sha256_file(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name not in leave_out}


def verify_companions(run_dir: Path, manifest: dict, writer: str) -> None:
    """Refuse when a file the manifest names beside its main file (`companions`: path -> sha256) is missing
    or changed."""
    for name, sha in manifest.get("companions", {}).items():
        path = Path(run_dir) / name
        if not path.is_file() or sha256_file(path) != sha:
            raise CartError(f"{path} is missing or does not match {manifest['file']}'s manifest (edited by hand?): "
                            f"rerun `{writer}`")


def require_built_from(output: dict, output_name: str, run_dir: Path, input_name: str) -> None:
    """Refuse a stage output (its manifest `output`) built from another version of `input_name`."""
    _, current = verified_input(run_dir, input_name)
    if output["inputs"].get(input_name) != current["sha256"]:
        raise CartError(
            f"{Path(run_dir) / output_name} was built from another {input_name}: "
            f"rerun `{WRITER.get(output_name)}`"
        )
