"""Every subcommand meets a bad number the same way: exit code 2 and one line on stderr, no traceback."""

import subprocess
import sys

import pytest

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
