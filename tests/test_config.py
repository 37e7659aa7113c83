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
                                                     "corpus.query_splits=[val, test]", "model.fusion=false"])
    assert cfg.embed.batch_size == 7
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.corpus.query_splits == ["val", "test"]
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
    with pytest.raises(CartError, match="broken.yaml: not valid YAML"):
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
