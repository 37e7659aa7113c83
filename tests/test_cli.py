"""The command line against a hostile user: every subcommand meets a bad number the same way (exit code 2 and
one line on stderr, no traceback), and no command ruins a trained run."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cart import files
from cart.data import corpus
from cart.encoders import embed
from cart.errors import CartError
from cart.index import build_ids
from cart.retrieve.retriever import Retriever
from conftest import ROOT

CONFIG = ["--config", "configs/emoji.yaml"]


@pytest.mark.parametrize("args, message", [
    (["corpus", *CONFIG, "seed=-1"], "seed must be at least 0"),
    (["embed", *CONFIG, "embed.batch_size=0"], "embed.batch_size must be at least 1"),
    (["ids", *CONFIG, "ids.clusters=0"], "ids.clusters must be at least 1"),
    (["caption", *CONFIG, "caption.batch_size=-2"], "caption.batch_size must be at least 1"),
    (["train", *CONFIG, "train.batch_size=0"], "train.batch_size must be at least 1"),
    (["train", *CONFIG, "train.learning_rate=nan"], "train.learning_rate must be a finite number"),
    (["eval", *CONFIG, "eval.batch_size=-5"], "eval.batch_size must be at least 1"),
    (["pipeline", *CONFIG, "train.epochs=0"], "train.epochs must be at least 1"),
    (["retrieve", "--run", "nowhere", "-k", "0", "red"], "argument -k: must be at least 1, got 0"),
    (["retrieve", "--run", "nowhere", "--beams", "0", "red"], "argument --beams: must be at least 1, got 0"),
    (["retrieve", "--run", "nowhere", "--batch-size", "-1", "red"], "argument --batch-size: must be at least 1, got -1"),
    (["retrieve", "--run", "nowhere", "--batch-size", "0", "red"], "argument --batch-size: must be at least 1, got 0"),
    (["retrieve", "--run", "nowhere", "-k", "two", "red"], "argument -k: expected a whole number, got 'two'"),
    (["generate", "a cat", *CONFIG, "generate.images=0"], "generate.images must be at least 1"),
    (["generate", "a cat", *CONFIG, "generate.steps=1.5"], "generate.steps should be int"),
])
def test_bad_numbers_are_one_line_errors(args, message):
    done = subprocess.run([sys.executable, "-m", "cart", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"cart {args[0]}: error: ") and message in done.stderr
    assert done.stdout == ""


def copy_of(trained, tmp_path):
    """A copy of the session's tiny trained run under tmp_path; config(*overrides) for it."""
    source = trained().run_dir
    shutil.copytree(source, tmp_path / "runs" / source.name, symlinks=True)
    return lambda *extra: trained(f"output_dir={tmp_path / 'runs'}", *extra)


def test_rerunning_a_stage_never_replaces_what_a_trained_model_was_built_from(trained, tmp_path, capsys):
    config = copy_of(trained, tmp_path)
    run_dir = config().run_dir
    names = (files.CORPUS, files.EMBEDDINGS, files.IDS, files.TRIE, files.MODEL_WEIGHTS)
    before = {name: files.sha256_file(run_dir / name) for name in names}
    corpus.run(config())
    embed.run(config())
    build_ids.run(config())
    assert capsys.readouterr().out.count("is up to date") == 3  # the same inputs and settings: nothing to do
    np.save(tmp_path / "other.npy", np.random.default_rng(1).normal(size=(12, 8)).astype(np.float32))
    with pytest.raises(CartError, match=rf"{run_dir}/embeddings.safetensors exists, made from other inputs or "
                                        r"settings, and ids.safetensors.* were built from it: .*`cart embed --force`"):
        embed.run(config(f"embed.weights={tmp_path / 'other.npy'}"))
    with pytest.raises(CartError, match=r"ids.safetensors exists, made from other inputs or settings, and "
                                        r".*model/model.safetensors.* were built from it: .*`cart ids --force`"):
        build_ids.run(config("ids.codebook_size=3"))
    assert {name: files.sha256_file(run_dir / name) for name in names} == before
    assert Retriever.load(run_dir).search("red number 0")[0]  # the trained run still answers
    done = subprocess.run([sys.executable, "-m", "cart", "ids", "--config", "configs/tiny.yaml", *trained.overrides,
                           f"output_dir={tmp_path / 'runs'}", "ids.codebook_size=3"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "`cart ids --force`" in done.stderr
    build_ids.run(config("ids.codebook_size=3"), force=True)
    assert "model/model.safetensors" in capsys.readouterr().err.split("built from it, will then be stale")[0]
    with pytest.raises(CartError, match="was built from another ids.safetensors"):
        Retriever.load(run_dir)


def test_an_edited_model_manifest_is_refused(trained, tmp_path):
    run_dir = copy_of(trained, tmp_path)().run_dir
    where = files.manifest_path(run_dir / files.MODEL_WEIGHTS)
    manifest = json.loads(where.read_text())
    where.write_text(json.dumps(manifest | {"rerank_weight": 1.0}, indent=2))
    with pytest.raises(CartError, match="model.manifest.json does not match its own checksum"):
        Retriever.load(run_dir)
    manifest["config"]["retrieve"]["beam_width"] = 3
    where.write_text(json.dumps(manifest, indent=2))
    done = subprocess.run([sys.executable, "-m", "cart", "retrieve", "--run", str(run_dir), "red"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "does not match its own checksum" in done.stderr and done.stdout == ""


def test_a_model_with_non_finite_weights_is_never_loaded(trained, tmp_path):
    run_dir = copy_of(trained, tmp_path)().run_dir
    path = run_dir / files.MODEL_WEIGHTS
    manifest = json.loads(files.manifest_path(path).read_text())
    weights = load_file(str(path))
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(path), metadata={"format": "pt"})
    kept = {k: v for k, v in manifest.items() if k not in ("stage", "file", "sha256", "inputs", "config",
                                                            "cart_version", "created", "manifest_sha256")}
    files.write_manifest(path, manifest["stage"], manifest["config"], manifest["inputs"], **kept)  # as if saved so
    with pytest.raises(CartError, match="model.safetensors holds NaN or infinite weights"):
        Retriever.load(run_dir)
