import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cart import encoders, files
from cart.cli import main
from cart.data import corpus
from cart.encoders import embed
from cart.encoders import imagebind
from cart.errors import CartError
from cart.eval import evaluate
from conftest import ROOT, TINY_IMAGEBIND, launch_two_processes, one_thread, silent_wav, unit_rows, write_jsonl


def embeddings(run_dir):
    return load_file(str(run_dir / files.EMBEDDINGS))["embeddings"]


def test_corpus_then_embed_writes_rows_in_corpus_order(tiny_config, manifest):
    cfg = tiny_config(f"corpus.path={manifest}")
    corpus.run(cfg)
    out = embed.run(cfg)
    matrix = embeddings(cfg.run_dir)
    assert matrix.dtype == torch.float32 and matrix.shape == (6, 1280) and unit_rows(matrix)
    manifest_json = json.loads(files.manifest_path(out).read_text())
    assert manifest_json["inputs"] == {files.CORPUS: files.sha256_file(cfg.run_dir / files.CORPUS)}
    assert manifest_json["dim"] == 1280 and manifest_json["encoder"] == "efficientnet-lite0"
    assert not (cfg.run_dir / files.EMBEDDINGS_PARTIAL).exists()
    # row i is item i: embedding item 3 alone gives row 3
    alone = encoders.EfficientNetLite0(torch.device("cpu")).encode([corpus.read(cfg.run_dir)[3]])
    assert torch.allclose(matrix[3], torch.nn.functional.normalize(alone, dim=-1)[0], atol=1e-5)


def test_interrupted_embed_resumes_where_it_stopped(tiny_config, manifest, monkeypatch):
    cfg = tiny_config(f"corpus.path={manifest}")  # batch 2, a shard after every batch
    corpus.run(cfg)
    reference = embeddings(embed.run(cfg).parent).clone()
    (cfg.run_dir / files.EMBEDDINGS).unlink()

    calls = []
    real_encode = encoders.EfficientNetLite0.encode

    def interrupted(self, records):
        calls.append([r["id"] for r in records])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(self, records)

    monkeypatch.setattr(encoders.EfficientNetLite0, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed.run(cfg)
    assert not (cfg.run_dir / files.EMBEDDINGS).exists()
    assert len(list((cfg.run_dir / files.EMBEDDINGS_PARTIAL).glob("shard-*"))) == 2

    calls.clear()
    monkeypatch.setattr(encoders.EfficientNetLite0, "encode", lambda self, r: calls.append(r) or real_encode(self, r))
    embed.run(cfg)
    assert len(calls) == 1 and [r["id"] for r in calls[0]] == ["item4", "item5"]  # only the last batch
    assert torch.allclose(embeddings(cfg.run_dir), reference, atol=1e-6)


def test_two_gloo_processes_embed_the_same_bytes_as_one(tiny_config, manifest):
    one = tiny_config(f"corpus.path={manifest}", "run=one")  # 6 items, batches of 2: 3 shards, 2 for process 0
    corpus.run(one)
    two = one.run_dir.with_name("two")
    two.mkdir()
    for name in (files.CORPUS, files.manifest_path(one.run_dir / files.CORPUS).name):
        (two / name).write_bytes((one.run_dir / name).read_bytes())
    with one_thread():
        embed.run(one)
    done = launch_two_processes("embed", "--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={one.output_dir}",
                                f"corpus.path={manifest}", "run=two", port=29518)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 shards of 2 items over 2 processes" in done.stdout
    assert (two / files.EMBEDDINGS).read_bytes() == (one.run_dir / files.EMBEDDINGS).read_bytes()
    assert not (two / files.EMBEDDINGS_PARTIAL).exists()


def test_partial_work_from_another_corpus_is_discarded(tiny_config, manifest, tmp_path, monkeypatch):
    cfg = tiny_config(f"corpus.path={manifest}")
    corpus.run(cfg)
    partial = cfg.run_dir / files.EMBEDDINGS_PARTIAL
    partial.mkdir(parents=True)
    (partial / "state.json").write_text(json.dumps({"corpus": "another"}))
    torch.save({}, partial / "shard-000000.safetensors")
    embed.run(cfg)
    assert embeddings(cfg.run_dir).shape == (6, 1280)


def test_embed_refuses_a_stale_or_missing_corpus(tiny_config, manifest):
    cfg = tiny_config(f"corpus.path={manifest}")
    with pytest.raises(CartError, match="corpus.jsonl is missing: run `cart corpus` first"):
        embed.run(cfg)
    corpus.run(cfg)
    path = cfg.run_dir / files.CORPUS
    path.write_text(path.read_text().replace("item0", "itemX"))
    with pytest.raises(CartError, match="does not match its manifest"):
        embed.run(cfg)


def test_encoder_without_the_modality_is_a_clear_error(tiny_config, tmp_path, media):
    silent_wav(tmp_path / "a.wav")
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "i", "modality": "image", "path": "media/img0.png", "texts": ["x"]},
        {"id": "s", "modality": "audio", "path": "a.wav", "texts": ["y"]},
    ])
    cfg = tiny_config(f"corpus.path={path}")
    corpus.run(cfg)
    with pytest.raises(CartError, match="cannot embed audio items \\(1 in the corpus, e.g. 's'\\); use imagebind"):
        embed.run(cfg)


def test_precomputed_through_the_stage(tiny_config, manifest, tmp_path):
    cfg = tiny_config(f"corpus.path={manifest}")
    corpus.run(cfg)
    np.save(tmp_path / "e.npy", np.arange(24, dtype=np.float32).reshape(6, 4) + 1)
    cfg.embed.encoder, cfg.embed.weights = "precomputed", str(tmp_path / "e.npy")
    embed.run(cfg)
    assert embeddings(cfg.run_dir).shape == (6, 4) and unit_rows(embeddings(cfg.run_dir))


def test_precomputed_embeddings_must_be_real_numbers(tiny_config, manifest, tmp_path):
    cfg = tiny_config(f"corpus.path={manifest}", "embed.encoder=precomputed", f"embed.weights={tmp_path / 'e.npy'}")
    corpus.run(cfg)
    np.save(tmp_path / "e.npy", np.array([["a", "b"]] * 6))
    with pytest.raises(CartError, match="e.npy: holds <U1 values; embeddings are real numbers"):
        embed.run(cfg)
    np.save(tmp_path / "e.npy", np.array([[{"a": 1}]] * 6, dtype=object))
    with pytest.raises(CartError, match="e.npy: cannot read it as a NumPy array: Object arrays cannot be loaded"):
        embed.run(cfg)


def test_imagebind_through_the_stage(tiny_config, manifest, tmp_path):
    imagebind_model, _ = imagebind._imagebind_package()
    torch.save(imagebind_model.ImageBindModel(**TINY_IMAGEBIND).state_dict(), tmp_path / "ib.pth")
    cfg = tiny_config(f"corpus.path={manifest}", "embed.encoder=imagebind", f"embed.weights={tmp_path / 'ib.pth'}",
                      f"embed.imagebind_arch={json.dumps(TINY_IMAGEBIND)}")
    corpus.run(cfg)
    embed.run(cfg)
    items = embeddings(cfg.run_dir)
    assert items.shape == (6, 8) and unit_rows(items)
    # the `dense` baseline on this run: the queries by ImageBind's text tower, ranked by cosine to the items
    dense = evaluate._baseline("dense", corpus.read(cfg.run_dir), cfg)
    queries = ["a red circle", "a dog barking"]
    rows, scores = dense.search(queries, k=3)
    tower = encoders.ImageBind(str(tmp_path / "ib.pth"), TINY_IMAGEBIND, torch.device("cpu"))
    cosine = tower.encode_text(queries) @ items.T
    assert rows.tolist() == cosine.topk(3).indices.tolist()
    assert np.allclose(scores, cosine.topk(3).values.numpy(), atol=1e-5)


def test_cli_on_bad_skip(tmp_path, manifest, media, capsys):
    (media / "img2.png").unlink()
    main(["corpus", "--config", str(ROOT / "configs/tiny.yaml"), "--on-bad", "skip",
          f"output_dir={tmp_path / 'cli'}", f"corpus.path={manifest}"])
    captured = capsys.readouterr()
    assert "manifest.jsonl line 3: missing media file" in captured.err
    assert "corpus: 5 items" in captured.out and "1 skipped" in captured.out


def test_cli_runs_the_stages(tmp_path, manifest, capsys):
    args = ["--config", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / 'cli'}", f"corpus.path={manifest}"]
    main(["corpus", *args])
    main(["embed", *args])
    out = capsys.readouterr().out
    assert "corpus: 6 items" in out and "embed: 6 x 1280" in out
    assert (tmp_path / "cli/tiny" / files.EMBEDDINGS).exists()
