import shutil
import subprocess
import sys

import pytest

from cart.config import Config, load_config
from cart.errors import CartError
from conftest import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.run == path.stem


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs/emoji.yaml", ["embed.batch_size=7", "train.learning_rate=1e-3",
                                                     "corpus.query_splits=[dev, test]", "model.fusion=false"])
    assert cfg.embed.batch_size == 7
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.corpus.query_splits == ["dev", "test"]
    assert cfg.model.fusion is False


@pytest.mark.parametrize("overrides, message", [
    (["embed.batchsize=3"], "unknown config key 'embed.batchsize'"),
    (["nosuch=1"], "unknown config key 'nosuch'"),
    (["embed.batch_size=many"], "embed.batch_size should be int, got str 'many'"),
    (["embed.batch_size=true"], "embed.batch_size should be int, got bool"),
    (["corpus.source=nowhere"], "corpus.source must be one of emoji, karpathy, coco, manifest, folder"),
    (["corpus.query_splits=test"], "corpus.query_splits should be a list"),
    (["embed=3"], "embed should be a section"),
    (["novalue"], "expected key=value"),
])
def test_bad_config_values_name_the_key(overrides, message):
    with pytest.raises(CartError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(ROOT / "configs/emoji.yaml", overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(CartError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(CartError, match="list.yaml: expected a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("embed: {batch_size: 3\n")
    with pytest.raises(CartError, match="broken.yaml line 2: not valid YAML"):
        load_config(tmp_path / "broken.yaml")


@pytest.mark.parametrize("args, message", [
    (["corpus", "--config", "nope.yaml"], "cart corpus: error: config file not found: nope.yaml"),
    (["embed", "--config", "configs/emoji.yaml", "embed.encoder=clip"], "cart embed: error: configs/emoji.yaml: embed.encoder must be one of"),
    (["corpus", "--config", "configs/tiny.yaml", "corpus.path=nowhere.jsonl"], "cart corpus: error: corpus.path not found: nowhere.jsonl"),
])
def test_cli_prints_one_line_errors(args, message):
    done = subprocess.run([sys.executable, "-m", "cart", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(message)
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=-1", "train.batch_size must be at least 1, got -1"),
    ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
    ("train.gradient_accumulation=0", "train.gradient_accumulation must be at least 1"),
    ("train.learning_rate=-1", "train.learning_rate must be above 0, got -1.0"),
    ("train.learning_rate=nan", "train.learning_rate must be a finite number, got 'nan'"),
    ("train.learning_rate=.inf", "train.learning_rate must be a finite number"),
    ("model.num_heads=0", "model.num_heads must be at least 1"),
    ("model.num_layers=0", "model.num_layers must be at least 1"),
    ("model.dropout=2", "model.dropout must be below 1, got 2.0"),
    ("model.d_model=100", r"model.d_model \(100\) must be a multiple of model.num_heads \(6\)"),
    ("train.save_every=0", "train.save_every must be at least 1"),
    ("train.epochs=0", "train.epochs must be at least 1"),
    ("train.rank_weight=-0.5", "train.rank_weight must be at least 0, got -0.5"),
    ("train.rank_negatives=0", "train.rank_negatives must be at least 1, got 0"),
    ("train.rank_after=-1", "train.rank_after must be at least 0, got -1"),
    ("ids.counter=order", "ids.counter must be one of error, residual"),
    ("embed.save_every=0", "embed.save_every must be at least 1"),
    ("caption.save_every=0", "caption.save_every must be at least 1"),
    ("eval.save_every=-2", "eval.save_every must be at least 1"),
    ("retrieve.batch_size=0", "retrieve.batch_size must be at least 1"),
    ("retrieve.untrained_by_cosine=-1", "retrieve.untrained_by_cosine must be at least 0, got -1"),
    ("ids.balance=0.5", r"ids.balance must be 0 \(off\) or at least 1 \(an even share\), got 0.5"),
    ("ids.balance=.nan", "ids.balance must be a finite number"),
    ("ids.balance=.inf", "ids.balance must be a finite number"),
    ("embed.save_every=-3", "embed.save_every must be at least 1"),
    ("ids.rqvae_batch_size=0", "ids.rqvae_batch_size must be at least 1"),
    ("ids.rqvae_latent=0", "ids.rqvae_latent must be at least 1"),
    ("ids.rqvae_hidden=-4", "ids.rqvae_hidden must be at least 1"),
    ("ids.rqvae_steps=0", "ids.rqvae_steps must be at least 1"),
    ("retrieve.beam_width=0", "retrieve.beam_width must be at least 1, got 0"),
    ("seed=-1", "seed must be at least 0, got -1"),
    ("seed=99999999999", "seed must be below 4294967296"),
    ("eval.baselines=[bm26]", r"eval.baselines\[0\] must be one of bm25, minilm, dense"),
    ("generate.name=../../x", "generate.name must be a plain folder name"),
    ("run=''", "run must name the run folder"),
    ("embed.device=banana", "embed.device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"),
    ("eval.device=gpu", "eval.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("caption.device=cuda:x", "caption.device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
    ("generate.device=cuda:4096", "generate.device is 'cuda:4096', but torch sees .* CUDA GPU"),
    ("retrieve.top_k=11", r"retrieve.top_k \(11\) must be at most retrieve.beam_width \(10\)"),
])
def test_out_of_range_values_are_refused_when_the_config_loads(override, message):
    with pytest.raises(CartError, match=f"configs/emoji.yaml: {message}"):
        load_config(ROOT / "configs/emoji.yaml", [override])


def test_cross_field_checks_run_when_the_config_loads():
    with pytest.raises(CartError, match="model.init_embeddings minilm needs MiniLM.s tokenizer"):
        load_config(ROOT / "configs/tiny.yaml", ["model.tokenizer=/somewhere", "model.init_embeddings=minilm"])
    assert load_config(ROOT / "configs/tiny.yaml", ["model.tokenizer=/somewhere", "model.init_embeddings=random"])
    with pytest.raises(CartError, match="ids.counter residual needs codes that collide"):
        load_config(ROOT / "configs/tiny.yaml", ["ids.counter=residual", "ids.scheme=atomic"])


def test_a_folder_given_as_config(tmp_path):
    with pytest.raises(CartError, match=f"--config {tmp_path} is a folder: give a YAML file"):
        load_config(tmp_path)


def test_the_tiny_config_runs_as_shipped_once_its_input_is_made(tmp_path):
    """configs/tiny.yaml points at data/tiny, which its header says how to make."""
    assert "scripts/make_tiny_data.py" in (ROOT / "configs/tiny.yaml").read_text().split("\nrun:")[0]
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    subprocess.run([sys.executable, str(ROOT / "scripts/make_tiny_data.py")], cwd=tmp_path, check=True,
                   capture_output=True)
    done = subprocess.run([sys.executable, "-m", "cart", "corpus", "--config", "configs/tiny.yaml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "corpus: 6 items" in done.stdout


def test_a_config_starts_from_its_base_and_changes_what_it_names(tmp_path):
    (tmp_path / "a.yaml").write_text("run: a\ntrain: {epochs: 3, batch_size: 8}\nmodel: {fusion: false}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nrun: b\ntrain: {epochs: 5}\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.learning_rate=0.01"])
    assert (cfg.run, cfg.train.epochs, cfg.train.batch_size, cfg.model.fusion) == ("b", 5, 8, False)
    assert cfg.train.learning_rate == pytest.approx(0.01)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    with pytest.raises(CartError, match="a.yaml: base b.yaml leads back to itself"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(CartError, match="config file not found: .*nowhere.yaml"):
        load_config(tmp_path / "c.yaml")


def test_cuda_is_refused_when_the_config_loads_on_a_machine_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for key in ("embed.device", "eval.device", "generate.device", "caption.device"):
        with pytest.raises(CartError, match=f"{key} is 'cuda', but torch sees no CUDA GPU"):
            load_config(ROOT / "configs/tiny.yaml", [f"{key}=cuda"])


def test_a_config_that_names_no_run_and_no_corpus_is_refused(tmp_path):
    """An empty file (or /dev/null) is a mistake, not the emoji demo's defaults."""
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# nothing yet\ntrain: {epochs: 2}\n")
    for path in (tmp_path / "empty.yaml", tmp_path / "comments.yaml", "/dev/null"):
        with pytest.raises(CartError, match=f"{path}: names no run and no corpus"):
            load_config(path)
    with pytest.raises(CartError, match="defaults: names no run and no corpus"):
        load_config(None, ["train.epochs=2"], named=True)
    assert load_config(tmp_path / "empty.yaml", ["run=mine"]).run == "mine"
    assert load_config(None).run == "emoji"  # the Python API's defaults stay the defaults


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    (tmp_path / "twice.yaml").write_text("run: a\ntrain:\n  epochs: 3\n  batch_size: 8\n  epochs: 5\n")
    with pytest.raises(CartError, match=r"twice.yaml line 5: not valid YAML: key 'epochs' is given twice"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "top.yaml").write_text("run: a\nrun: b\n")
    with pytest.raises(CartError, match=r"top.yaml line 2: not valid YAML: key 'run' is given twice"):
        load_config(tmp_path / "top.yaml")


def test_a_file_too_large_to_be_a_config_is_refused_without_reading_it_all():
    with pytest.raises(CartError, match="/dev/zero: larger than 1 MiB: not a config file"):
        load_config("/dev/zero")
