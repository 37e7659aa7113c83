"""The run folder: file names, atomic writes, manifests and freshness checks.

Stages talk only through files in `checkpoints/<run>/`. Each file `X.ext` has a
manifest `X.manifest.json` beside it: the stage that wrote it, the file's
sha256, the sha256 of every input it was built from, the resolved config, the
package version and a checksum of the manifest's own content. A stage refuses
an input whose own manifest does not match it (edited or half-written), an
output built from other inputs, and to replace an output that later outputs
were built from (`check_replace`). One stage at a time writes a run folder
(`run_lock`). `cart add` and `cart remove` replace several files at once (`publish_files`), and the
files they write name the versions they extend (`extends`): a model trained on an earlier version of
the identifiers still fits the new one (`require_built_from(..., extended=True)`).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import sys
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
LOCK = ".lock"  # held (flock) by the stage writing the run folder; names it and its PID
STAGED = ".staged"  # new versions of several files, written whole before `publish_files` moves them in
JOURNAL = ".publish.json"  # the names `publish_files` is moving in: while it exists, the new version is decided

# Which command writes each file, for "run X first" messages.
WRITER = {CORPUS: "cart corpus", EMBEDDINGS: "cart embed", IDS: "cart ids", CAPTIONS: "cart caption",
          MODEL_WEIGHTS: "cart train"}


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`, else remove it.
    What a killed writer of `path` left (its temporary) is removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this PID runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def remove_dead_temporaries(folder: Path, name: str | None = None) -> None:
    """Remove the temporaries `.<name>.tmp-<PID>` (files or folders; of any name when None) in `folder`
    whose process is gone: a kill left them, and no one will finish them."""
    pattern = re.compile(rf"\.{re.escape(name) if name else '.+'}\.tmp-(\d+)")
    for entry in Path(folder).glob(f".{glob.escape(name) if name else '*'}.tmp-*"):
        match = pattern.fullmatch(entry.name)
        if match and int(match[1]) != os.getpid() and not process_alive(int(match[1])):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


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
    """Record what `path` is and what it was built from (`inputs`: file name -> sha256), with a checksum
    of the record itself (`manifest_sha256`), so that an edited manifest is refused like an edited file."""
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
    manifest = json.loads(json.dumps(manifest))  # as it will read back (tuples become lists)
    manifest["manifest_sha256"] = _content_sha(manifest)
    write_text(manifest_path(path), json.dumps(manifest, indent=2) + "\n")
    return manifest


def update_manifest(path: Path, **changes) -> dict:
    """Change fields of the (verified) manifest of `path`, its checksum made anew."""
    manifest = {k: v for k, v in read_manifest(path).items() if k != "manifest_sha256"} | changes
    manifest["manifest_sha256"] = _content_sha(json.loads(json.dumps(manifest)))
    write_text(manifest_path(path), json.dumps(manifest, indent=2) + "\n")
    return manifest


def _content_sha(manifest: dict) -> str:
    """sha256 of a manifest's content, its own checksum left out, in a canonical form."""
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_manifest(path: Path) -> dict:
    """The manifest of the stage output `path`, refusing one that is missing, unreadable or edited."""
    where, writer = manifest_path(path), WRITER.get(_run_name(path), "the stage that wrote it")
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CartError(f"{where} is missing or unreadable: rerun `{writer}`") from None
    if not isinstance(manifest, dict) or manifest.get("manifest_sha256") != _content_sha(manifest):
        raise CartError(f"{where} does not match its own checksum (edited by hand, or written by an older cart): "
                        f"rerun `{writer}`")
    return manifest


def _run_name(path: Path) -> str:
    """`path`'s name inside the run folder (`model/model.safetensors` for the model's weights)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name == MODEL else path.name


def verified_input(run_dir: Path, name: str) -> tuple[Path, dict]:
    """Return a stage output and its manifest, refusing one that is missing or does not match its manifest."""
    settle(run_dir)
    path = Path(run_dir) / name
    if not path.exists():
        raise CartError(f"{path} is missing: run `{WRITER.get(name, 'the stage that writes it')}` first")
    manifest = read_manifest(path)
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


def require_built_from(output: dict, output_name: str, run_dir: Path, input_name: str, extended: bool = False) -> None:
    """Refuse a stage output (its manifest `output`) built from another version of `input_name`. With
    `extended`, a version that `cart add` or `cart remove` made of the one it was built from will do (the
    model: it emits identifiers, and the new ones are coded as the old ones were)."""
    _, current = verified_input(run_dir, input_name)
    built = output["inputs"].get(input_name)
    if built != current["sha256"] and not (extended and built in current.get("extends", [])):
        raise CartError(
            f"{Path(run_dir) / output_name} was built from another {input_name}: "
            f"rerun `{WRITER.get(output_name)}`"
        )


def check_replace(run_dir: Path, name: str, recipe: dict, force: bool) -> bool:
    """Before a stage writes `name`: True when the present one is whole and was made from `recipe` (the
    inputs and settings that decide its content; `write_manifest(..., recipe=recipe)` records it), so the
    stage has nothing to do (unless `force`). A present `name` is replaced freely when nothing was built
    from it, or when it is stale itself (its own inputs changed); otherwise only with `force`, which says
    what goes stale, and without it a CartError says what was built from it."""
    path = Path(run_dir) / name
    if not path.exists():
        return False
    sha = sha256_file(path)
    try:
        manifest = read_manifest(path)
    except CartError:
        manifest = {}  # a damaged manifest: nothing here is known to be up to date
    recipe = json.loads(json.dumps(recipe))
    if manifest.get("sha256") == sha and manifest.get("recipe") == recipe and not force:
        return True
    users = built_from(run_dir, name, sha, manifest.get("extends", []))
    if not users or not _inputs_current(run_dir, manifest.get("inputs", {})):
        return False
    command = WRITER.get(name, "the stage")
    if not force:
        raise CartError(f"{path} exists, made from other inputs or settings, and {', '.join(users)} were built "
                        f"from it: choose another run name (run=NAME), or `{command} --force` to replace it (then "
                        f"rerun the later stages)")
    if os.environ.get("RANK", "0") == "0":
        print(f"{command}: --force: {path} will be replaced; {', '.join(users)}, built from it, will then be stale",
              file=sys.stderr)
    return False


def built_from(run_dir: Path, name: str, sha: str, extends: list[str] = ()) -> list[str]:
    """The outputs of the run folder whose manifests name the version `sha` of `name` among their inputs,
    or a version it `extends` (a model trained before `cart add`)."""
    run_dir, versions = Path(run_dir), {sha, *extends}
    users = []
    for where in sorted([*run_dir.glob("*.manifest.json"), *(run_dir / MODEL).glob("*.manifest.json")]):
        try:
            manifest = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        output = where.parent / str(manifest.get("file"))
        if isinstance(manifest, dict) and manifest.get("inputs", {}).get(name) in versions and output.exists():
            users.append(_run_name(output))
    return users


def _inputs_current(run_dir: Path, inputs: dict) -> bool:
    """Whether each input that is a file of the run folder is still the version named in `inputs`."""
    for input_name, sha in inputs.items():
        path = Path(run_dir) / input_name
        if input_name in WRITER and path.exists():
            try:
                if read_manifest(path).get("sha256") != sha:
                    return False
            except CartError:
                return False
    return True


@contextmanager
def run_lock(run_dir: Path, command: str):
    """Hold the run folder while `command` writes it: a second writer gets a one-line error naming the
    holder and its PID. The lock is the kernel's (flock): a killed holder's lock is free at once, so the
    next run takes it over. Under `accelerate launch` the first process holds it for all. A folder made
    here and left empty is removed again."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK, "a+", encoding="utf-8")
    except OSError as e:
        raise CartError(f"cannot write the run folder {run_dir}: {e.strerror or e} (output_dir and run name it)") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise CartError(f"{run_dir} is being written by {holder}: wait for it to end, or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"`{command}` (PID {os.getpid()})\n")
        handle.flush()
        _finish_files(run_dir)
        yield
    finally:
        handle.close()
        if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            shutil.rmtree(run_dir, ignore_errors=True)


def staged_folder(run_dir: Path) -> Path:
    """An empty folder inside the run folder to write the new versions of several files in, under their
    own names (with their manifests), before `publish_files` moves them in; what a killed writer left
    there is removed. The caller holds `run_lock`."""
    folder = Path(run_dir) / STAGED
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def publish_files(run_dir: Path) -> None:
    """Move every file of the staged folder over its namesake in the run folder, as one step: the journal
    naming them is written (atomically) first, so a kill before it leaves the old version whole (the
    staged folder is cleared by the next writer) and a kill after it the new one, which the next reader
    or writer finishes moving in (`settle`). The caller holds `run_lock`."""
    run_dir = Path(run_dir)
    names = sorted(p.name for p in (run_dir / STAGED).iterdir() if not p.name.startswith("."))
    for name in names:  # on disk before the journal promises them
        with open(run_dir / STAGED / name, "rb") as f:
            os.fsync(f.fileno())
    write_text(run_dir / JOURNAL, json.dumps(names) + "\n")
    _finish_files(run_dir)


def _finish_files(run_dir: Path) -> None:
    """Complete a `publish_files` that a kill interrupted (its journal is there), or clear what a writer
    killed before its journal staged (it is not)."""
    run_dir = Path(run_dir)
    journal, staged = run_dir / JOURNAL, run_dir / STAGED
    if journal.exists():
        for name in json.loads(journal.read_text(encoding="utf-8")):
            if (staged / name).exists():
                os.replace(staged / name, run_dir / name)
        _fsync_folder(run_dir)
        journal.unlink()
    shutil.rmtree(staged, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """Make the renames in `folder` durable before the journal that promised them goes."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def settle(run_dir: Path, wait: float = 30.0) -> None:
    """Before reading a run folder: when a `publish_files` is under way (its journal is there), wait for
    its writer to finish moving the files in, or finish it when its writer was killed, so that a reader
    never sees half of the old version and half of the new one."""
    run_dir = Path(run_dir)
    deadline = time.monotonic() + wait
    while (run_dir / JOURNAL).exists():
        try:
            handle = open(run_dir / LOCK, "a+", encoding="utf-8")
        except OSError:
            return  # a folder this process cannot write: it cannot finish another's work either
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its writer lives and is moving the files in: a few milliseconds
                if time.monotonic() > deadline:
                    handle.seek(0)
                    raise CartError(f"{run_dir} is being updated by {handle.read().strip() or 'another process'} "
                                    f"for more than {wait:.0f} s: wait for it to end, or stop it") from None
                time.sleep(0.02)
                continue
            _finish_files(run_dir)
