"""`cart train` end to end on a tiny model: files, validation split, W&B offline, resume after SIGKILL,
two gloo processes equal to one, bad input; and `cart caption` with a tiny random captioner."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cart import caption, encoders, files, train
from cart.data import corpus, pairs
from cart.encoders import embed
from cart.errors import CartError
from cart.index import build_ids
from cart.model import batches, model_io
from cart.model.losses import cart_loss
from cart.retrieve.retriever import Retriever
from conftest import ROOT, launch_two_processes, one_thread, prepare_run, write_jsonl

PYTHON = sys.executable


@pytest.fixture
def ready_run(tmp_path):
    return prepare_run(tmp_path)


def weights(run_dir):
    return load_file(str(run_dir / files.MODEL_WEIGHTS))


def final_weights(run_dir):
    """The weights after the last step (the newest state), whichever epoch validation preferred."""
    return load_file(str(train._states(run_dir)[-1] / "model.safetensors"))


def same_weights(a, b, atol=0.0):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def cart_command(config, *extra):
    return [PYTHON, "-m", "cart", "train", "--config", str(ROOT / "configs/tiny.yaml"), *config.overrides, *extra]


def test_train_writes_a_loadable_model_states_and_an_honest_validation_split(ready_run):
    cfg = ready_run("train.epochs=3", "train.keep_states=2")
    out = train.run(cfg)
    run_dir = cfg.run_dir
    assert out == run_dir / files.MODEL
    entries = list((run_dir / files.STATE).iterdir())
    states = [p for p in entries if not p.name.startswith(".")]
    assert len(states) == 2 and all(p.name.startswith("step_") for p in states)  # older ones removed
    # each state/step_N is a link to its complete hidden folder; no other folder, no temporary left
    assert {p.name for p in entries if p.name.startswith(".")} == {os.readlink(p) for p in states}
    summary = json.loads((run_dir / files.TRAIN_LOG).read_text())
    assert len(summary["history"]) == 3
    assert {"validation", "score", "train_r1", "epoch", "step"} <= set(summary["history"][0])
    assert set(summary["history"][0]["validation"]["texts"]) == {"R@1", "R@5", "R@10", "MRR@10"}
    assert summary["training_pairs"] + summary["validation_pairs"]["texts"] == 30  # 10 training items x 3 texts
    # validation pairs are training texts, never held-out queries; every item keeps a training text
    records = {r["id"]: r for r in corpus.read(run_dir)}
    validation = [json.loads(line) for line in (run_dir / files.VALIDATION).read_text().splitlines()]
    assert {pair["split"] for pair in validation} == {"texts"}
    assert len(validation) == summary["validation_pairs"]["texts"] == round(0.2 * 30)
    for pair in validation:
        kinds = {t["text"]: t["kind"] for t in records[pair["id"]]["texts"]}
        assert kinds[pair["text"]] == "caption"
    per_item = {}
    for pair in validation:
        per_item[pair["id"]] = per_item.get(pair["id"], 0) + 1
    assert max(per_item.values()) <= 2
    model, tokenizer, ids = model_io.load(run_dir)
    assert not model.training and model.config.cart_fusion
    encoded = tokenizer(["red number 0", "shape 3"], return_tensors="pt", padding=True)
    from cart.model.decoding import decode

    items, scores = decode(model, encoded["input_ids"], encoded["attention_mask"], ids.trie, beams=4, top_k=4)
    assert (items[:, 0] >= 0).all() and (items < 12).all()


def test_a_model_trained_on_other_identifiers_is_refused(ready_run):
    cfg = ready_run("train.epochs=1")
    train.run(cfg)
    build_ids.run(ready_run("ids.clusters=2"), force=True)
    with pytest.raises(CartError, match="was built from another ids.safetensors: rerun `cart train`"):
        model_io.load(cfg.run_dir)


def test_resume_with_another_config_is_a_clear_error(ready_run):
    train.run(ready_run("train.epochs=1"))
    with pytest.raises(CartError, match=r"step_\d+ was saved by a run with other settings or inputs "
                                        r"\(train.learning_rate: 0.001 -> 0.01\): remove .*state"):
        train.run(ready_run("train.epochs=2", "train.learning_rate=0.01"))
    train.run(ready_run("train.epochs=2"))  # more epochs is the same run: it resumes


def test_bad_inputs_are_clear_errors(ready_run, tmp_path):
    cfg = ready_run()
    # identifiers of another corpus: rebuild the corpus with one item fewer
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()][:-1]
    write_jsonl(tmp_path / "manifest.jsonl", rows)
    corpus.run(cfg, force=True)
    with pytest.raises(CartError, match="embeddings.safetensors was built from another corpus.jsonl"):
        train.run(cfg)
    # a corpus with no training texts at all
    for row in rows:
        row["split"] = "test"
    write_jsonl(tmp_path / "manifest.jsonl", rows)
    np.save(tmp_path / "emb.npy", np.random.default_rng(1).normal(size=(11, 8)).astype(np.float32))
    corpus.run(cfg, force=True)
    embed.run(cfg)
    build_ids.run(cfg)
    with pytest.raises(CartError, match="no training texts .* every text is a held-out query"):
        train.run(cfg)


def test_unknown_config_key_is_a_one_line_error(ready_run):
    done = subprocess.run(cart_command(ready_run, "train.epochz=3"), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("cart train: error:")
    assert "unknown config key 'train.epochz'" in done.stderr and "Traceback" not in done.stderr


def wandb_history(path):
    """The history rows of an offline W&B run file: LevelDB-log framing (7-byte file header; records of
    crc32, length, type in 32 KiB blocks) around wandb's protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, parts, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        parts = data[pos + 7: pos + 7 + length] if kind in (1, 2) else parts + data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_logged_metrics(ready_run, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = ready_run("train.tracker=wandb", "train.epochs=2")
    train.run(cfg)
    assert os.environ["WANDB_MODE"] == "offline"
    (run_file,) = (cfg.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    logged = {key for row in history for key in row}
    for key in ("loss", "cross_entropy", "kl", "learning_rate", "pairs_per_second", "validation_score",
                "texts_R@1", "texts_MRR@10", "train_r1"):
        assert key in logged, key
    validations = [row["validation_score"] for row in history if "validation_score" in row]
    expected = json.loads((cfg.run_dir / files.TRAIN_LOG).read_text())["history"]
    assert validations == pytest.approx([v["score"] for v in expected])
    assert [row["loss"] for row in history if "loss" in row][0] > 0


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(ready_run):
    settings = ["train.epochs=12", "train.patience=0", "train.save_every=1"]
    killed, whole = ready_run(*settings, "run=killed"), ready_run(*settings, "run=whole")
    for run in (killed, whole):  # the same inputs in two run folders
        shutil.copytree(ready_run().run_dir, run.run_dir)
    process = subprocess.Popen(cart_command(ready_run, *settings, "run=killed"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed.run_dir / files.STATE).glob("step_1[0-9]")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    states = train._states(killed.run_dir)
    assert states and int(states[-1].name.split("_")[1]) < 12 * 2  # killed before the end
    assert not (killed.run_dir / files.TRAIN_LOG).exists()
    train.run(killed)  # the same command again: continues from the newest state
    train.run(whole)
    assert same_weights(weights(killed.run_dir), weights(whole.run_dir))
    assert same_weights(final_weights(killed.run_dir), final_weights(whole.run_dir))


def test_two_gloo_processes_train_the_same_model_as_one(ready_run):
    settings = ["train.epochs=2", "model.dropout=0", "train.batch_size=4"]
    one = ready_run(*settings, "run=one")
    for name in ("one", "two"):
        shutil.copytree(ready_run().run_dir, one.run_dir.with_name(name))
    train.run(one)
    done = launch_two_processes("train", "--config", str(ROOT / "configs/tiny.yaml"), *ready_run.overrides, *settings,
                                "run=two", port=29517)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es)" in done.stdout + done.stderr
    assert same_weights(weights(one.run_dir), weights(one.run_dir.with_name("two")), atol=1e-5)
    # the last epoch too (the best model may be the first's): each epoch's batches reach both processes
    assert same_weights(final_weights(one.run_dir), final_weights(one.run_dir.with_name("two")), atol=1e-5)


def tiny_captioner(folder):
    """A BLIP captioner with random weights, built from configs, with MiniLM's WordPiece tokenizer."""
    from transformers import (AutoTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    tokenizer = AutoTokenizer.from_pretrained(encoders.minilm_dir())
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.cls_token_id,
                pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=16)).save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)


def test_caption_stage_writes_generated_captions_that_training_uses(ready_run, tmp_path):
    tiny_captioner(tmp_path / "blip")
    cfg = ready_run(f"caption.model={tmp_path / 'blip'}", "caption.per_item=2", "caption.max_new_tokens=4",
                    "caption.batch_size=5", "train.epochs=1")
    with one_thread():  # as each process of the two-process run below
        out = caption.run(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"item{i}" for i in range(12)]
    assert all(1 <= len(r["captions"]) <= 2 and all(r["captions"]) for r in rows)
    train.run(cfg)
    summary = json.loads((cfg.run_dir / files.TRAIN_LOG).read_text())
    given = {r["id"]: {t["text"] for t in r["texts"] if t["kind"] == "caption"} for r in corpus.read(cfg.run_dir)}
    new = sum(len(set(r["captions"]) - given[r["id"]]) for r in rows)  # a caption equal to a given one adds nothing
    assert new > 0
    # every given caption and every new generated one is a training or a validation pair, once
    assert summary["training_pairs"] + summary["validation_pairs"]["texts"] == sum(map(len, given.values())) + new
    with pytest.raises(CartError, match="caption.model: no model config.json in"):
        caption.run(ready_run(f"caption.model={tmp_path / 'nothing'}"))
    # two processes, two shards of 5 images and one of 2 between them: the same file
    two = cfg.run_dir.with_name("captions-two")
    shutil.copytree(ready_run().run_dir, two)
    (two / files.CAPTIONS).unlink()
    done = launch_two_processes("caption", "--config", str(ROOT / "configs/tiny.yaml"), *ready_run.overrides,
                                f"caption.model={tmp_path / 'blip'}", "caption.per_item=2", "caption.max_new_tokens=4",
                                "caption.batch_size=5", "caption.save_every=1", "run=captions-two", port=29521)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 shards of 5 items over 2 processes" in done.stdout
    assert (two / files.CAPTIONS).read_bytes() == out.read_bytes()


def test_minilm_word_embeddings_initialise_the_encoder(ready_run):
    full = model_io.minilm_word_embeddings(384)
    projected = model_io.minilm_word_embeddings(32)
    assert full.shape == (30522, 384) and projected.shape == (30522, 32)
    assert full.pow(2).mean().item() == pytest.approx(1.0, rel=1e-3)
    cfg = ready_run("model.init_embeddings=minilm")
    model = model_io.build_model(cfg, level_sizes=[4, 4], text_vocab_size=30522)
    assert torch.equal(model.get_input_embeddings().weight, projected)


def test_minilm_encoder_is_the_pretrained_model_and_trains_frozen(ready_run):
    cfg = ready_run("model.encoder=minilm", "model.d_model=384", "model.num_heads=6", "model.d_ff=64",
                    "model.num_decoder_layers=1", "model.freeze_encoder=true", "train.epochs=1")
    model = model_io.build_model(cfg, level_sizes=[4, 4], text_vocab_size=30522).eval()
    tokenizer = model_io.load_tokenizer(cfg)
    reference = encoders.minilm_sentence_model()  # sentence-transformers' own loading of the package
    encoded = tokenizer(["a red heart", "cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.encoder.bert(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
        theirs = reference(dict(encoded))["token_embeddings"]
    assert torch.allclose(ours, theirs, atol=1e-5)
    before = {k: v.clone() for k, v in model.encoder.bert.state_dict().items()}
    train.run(cfg)
    trained = model_io.load(cfg.run_dir)[0]
    assert all(torch.equal(before[k], v) for k, v in trained.encoder.bert.state_dict().items())
    with pytest.raises(CartError, match="model.encoder minilm needs model.d_model=384"):
        ready_run("model.encoder=minilm")


def test_length_grouped_batches_cover_each_pair_once_in_a_seeded_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 25, size=1000).tolist()
    sampler = batches.LengthGroupedBatches(lengths, batch_size=16, seed=3, window=10)
    first = list(sampler)
    assert len(first) == len(sampler) == 62 and all(len(b) == 16 for b in first)
    flat = [i for b in first for i in b]
    assert len(set(flat)) == len(flat)  # no pair twice in an epoch; 1000 - 62 * 16 = 8 left out
    assert list(sampler) == first  # the order depends on (seed, epoch) alone: a resumed run skips into it
    sampler.set_epoch(1)
    assert list(sampler) != first
    padded = np.mean([max(lengths[i] for i in b) for b in first])
    shuffled = rng.permutation(1000)[: 62 * 16].reshape(62, 16)
    assert padded < 0.7 * np.mean([max(lengths[i] for i in b) for b in shuffled])


def test_hard_negatives_are_near_the_item_and_never_a_right_answer():
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    train = pairs.Pairs(texts=["a", "b", "C"], items=[0, 1, 2])
    relevant = {"a": {0, 5}, "b": {1}, "c": {2, 3, 4}}
    negatives = batches.HardNegatives(x, train, relevant, count=3, pool=4)
    drawn = negatives([0, 1, 2])
    assert drawn.shape == (3, 3)
    unit = torch.nn.functional.normalize(x, dim=-1)
    for row, pair in zip(drawn.tolist(), range(3)):
        item = train.items[pair]
        nearest = set((unit[item] @ unit.T).topk(5).indices.tolist())  # the item and its 4 nearest
        assert set(row) <= nearest - relevant[train.texts[pair].lower()] - {item}
    assert torch.equal(negatives([0, 1, 2]), drawn)  # the draw depends on the batch's rows alone
    with pytest.raises(CartError, match="every item is a right answer of 'a'"):
        batches.HardNegatives(x[:2], pairs.Pairs(["a"], [0]), {"a": {0, 1}}, count=1)([0])


def test_subset_queries_join_short_training_texts_only():
    import random

    texts = ["cat", "face", "pet", "whiskers", "cat face pet whiskers"]
    made = pairs.subset_queries(texts, 6, 3, random.Random(0))
    assert len(made) == len(set(made)) == 6
    for query in made:
        words = query.split()
        assert 2 <= len(words) <= 3 and len(set(words)) == len(words)
        assert set(words) <= {"cat", "face", "pet", "whiskers"} and query not in texts
    assert pairs.subset_queries(["keycap"], 3, 3, random.Random(0)) == []
    assert pairs.subset_queries(["VA", "flag", "VA flag"], 5, 3, random.Random(0)) == ["flag VA"]  # the one new order


def test_subset_queries_never_use_a_validation_text(ready_run):
    cfg = ready_run("train.subset_queries=4")
    records = corpus.read(cfg.run_dir)
    plain = pairs.split_pairs(records, ready_run()).train
    splits = pairs.split_pairs(records, cfg)
    train, validation, relevant = splits.train, splits.validation["texts"], splits.relevant
    assert train.texts[: len(plain.texts)] == plain.texts  # the same split, subsets appended
    added = list(zip(train.texts[len(plain.texts):], train.items[len(plain.texts):]))
    assert added
    held = {}
    for text, row in zip(validation.texts, validation.items):
        held.setdefault(row, set()).add(text)
    for text, row in added:
        assert row in relevant[text.lower()]
        assert not any(v in text for v in held.get(row, ()))


def test_greedy_validation_and_resuming_with_another_beam_width(ready_run):
    cfg = ready_run("train.epochs=1", "retrieve.beam_width=1", "retrieve.top_k=1")
    train.run(cfg)
    history = json.loads((cfg.run_dir / files.TRAIN_LOG).read_text())["history"]
    assert len(history) == 1 and 0 <= history[0]["validation"]["texts"]["R@1"] <= 1
    # validation's beam width does not change the weights: the run resumes with another
    train.run(ready_run("train.epochs=2", "retrieve.beam_width=10"))
    assert len(json.loads((cfg.run_dir / files.TRAIN_LOG).read_text())["history"]) == 2


def test_what_a_killed_save_left_is_removed_on_start(ready_run):
    cfg = ready_run("train.epochs=1")
    for leftover in (".model.tmp", ".model.tmp-4242", ".model.1795000000000000000", "state/.step_3.tmp"):
        (cfg.run_dir / leftover).mkdir(parents=True)
        (cfg.run_dir / leftover / "model.safetensors").write_bytes(b"half")
    train.run(cfg)
    assert sorted(p.name for p in cfg.run_dir.glob(".model*")) == [os.readlink(cfg.run_dir / files.MODEL)]
    assert not (cfg.run_dir / "state/.step_3.tmp").exists()
    model_io.load(cfg.run_dir)


MINILM = ["model.encoder=minilm", "model.d_model=384", "model.num_heads=6", "model.d_ff=64", "model.num_decoder_layers=1",
          "model.freeze_encoder=true", "model.dropout=0", "model.max_query_tokens=24"]


def test_cached_encoder_layers_give_the_same_loss_and_gradients_as_running_the_encoder(ready_run):
    cfg = ready_run(*MINILM)
    splits = pairs.split_pairs(corpus.read(cfg.run_dir), cfg)
    tokenizer = model_io.load_tokenizer(cfg)
    model = model_io.build_model(cfg, build_ids.load(cfg.run_dir).layout.level_sizes, len(tokenizer))
    # as `cart train` does: the cache is made from the model as built, before any .train() or .eval()
    cache = batches.LayerCache(model.encoder, tokenizer, splits.train.texts, 24, torch.device("cpu"))
    model.train()
    assert len(cache.index) == len(set(splits.train.texts))
    labels = torch.tensor([[3, 7, 11, 1]] * len(splits.train.texts))
    rows = list(range(0, len(splits.train.texts), 3))  # texts of several lengths: padding differs
    results = []
    for layer_cache in (cache, None):
        batch = batches.make_batch(rows, splits.train, labels, tokenizer, 24, layer_cache)
        model.zero_grad()
        loss = cart_loss(model, batch, omega=0.0).total
        loss.backward()
        results.append((loss.item(), model.encoder.coarse_projection.weight.grad.clone()))
    (cached_loss, cached_grad), (direct_loss, direct_grad) = results
    assert cached_loss == pytest.approx(direct_loss, abs=1e-5)
    assert torch.allclose(cached_grad, direct_grad, atol=1e-5)


def test_name_shaped_validation_queries_are_never_trained_on(ready_run):
    cfg = ready_run("train.validation_names=4", "train.subset_queries=6", "train.validation_fraction=0.1")
    records = corpus.read(cfg.run_dir)
    splits = pairs.split_pairs(records, cfg)
    names = splits.validation["names"]
    assert len(names.texts) == 4
    trained = {text.lower() for text in splits.train.texts}
    held = {(row, text) for text, row in zip(splits.validation["texts"].texts, splits.validation["texts"].items)}
    held_out = {text.lower() for split in splits.validation.values() for text in split.texts}
    assert not held_out & trained  # no training query, tag subsets included, repeats a validation query
    for text, row in zip(names.texts, names.items):
        assert text.lower() not in trained and row in splits.relevant[text.lower()]
        own = set(pairs.training_texts(records[row])) - {t for r, t in held if r == row}
        assert any(" ".join(p) == text for k in (2, 3) for p in itertools.permutations(own, k))  # its own tags


def test_the_corpus_validation_queries_are_a_split_never_trained_on(ready_run):
    cfg = ready_run("train.subset_queries=6", "train.validation_names=4")
    records = corpus.read(cfg.run_dir)
    for row, text in ((0, "crimson square"), (1, "Crimson Square"), (2, "red number 0 shape 0")):
        records[row]["texts"].append({"text": text, "kind": "validation"})
    splits = pairs.split_pairs(records, cfg)
    given = splits.validation["V"]
    assert given.texts == ["crimson square", "Crimson Square", "red number 0 shape 0"] and given.items == [0, 1, 2]
    assert splits.relevant["crimson square"] == {0, 1}  # one name of two items: either is right
    trained = {text.lower() for text in splits.train.texts}
    assert not {text.lower() for text in given.texts} & trained  # no subset of item 0's tags repeats it either
    assert list(splits.validation) == ["V", "texts", "names"]


def test_item_text_embeddings_leave_out_the_validation_texts(ready_run, tmp_path):
    cfg = ready_run("embed.encoder=minilm-text", "corpus.query_splits=[]")  # every item has training texts
    corpus.run(cfg, force=True)
    embed.run(cfg)
    build_ids.run(cfg)
    records = corpus.read(cfg.run_dir)
    held_out = pairs.held_out_texts(records, cfg)
    manifest = json.loads(files.manifest_path(cfg.run_dir / files.EMBEDDINGS).read_text())
    assert held_out and manifest["validation_left_out"] == pairs.held_out_digest(held_out)
    expected = encoders.ItemText(torch.device("cpu")).encode(pairs.without_texts(records, held_out))
    assert torch.allclose(load_file(str(cfg.run_dir / files.EMBEDDINGS))["embeddings"], expected, atol=1e-5)
    with pytest.raises(CartError, match="embedded other validation texts than this run holds out"):
        train.run(ready_run("embed.encoder=minilm-text", "corpus.query_splits=[]", "train.validation_fraction=0.1"))


def test_the_encoders_top_layer_is_tuned_after_the_frozen_epochs_only(ready_run):
    cfg = ready_run(*MINILM, "model.tune_layers=1", "train.tune_after=1", "train.epochs=2", "train.patience=0",
                    "train.warmup_steps=1")
    pretrained = load_file(str(encoders.minilm_dir() / "model.safetensors"))
    train.run(cfg)
    trained = final_weights(cfg.run_dir)
    for name, value in pretrained.items():
        ours = trained.get(f"encoder.bert.{name}")
        if ours is None:  # the pooler, which fusion does not use
            continue
        assert torch.equal(ours, value) != name.startswith("encoder.layer.5."), name
    history = json.loads((cfg.run_dir / files.TRAIN_LOG).read_text())["history"]
    assert len(history) == 2


def test_a_diverging_run_stops_at_its_first_non_finite_loss_and_saves_nothing_of_it(ready_run):
    cfg = ready_run("train.learning_rate=1e9", "train.epochs=3")
    with pytest.raises(CartError, match=r"the loss became NaN or infinite at step (\d+) \(epoch 1, batch \1\): "
                                        r"training stopped, (keeping .*state/step_\d+|nothing was saved yet); "
                                        r"lower train.learning_rate \(1000000000.0\) or check the data"):
        train.run(cfg)
    for state in train._states(cfg.run_dir):  # what was saved is what came before the loss went wrong
        assert all(torch.isfinite(w).all() for w in load_file(str(state / "model.safetensors")).values())
    with pytest.raises(CartError, match="model.safetensors is missing: run `cart train` first"):
        model_io.load(cfg.run_dir)  # never a model that answers nothing
    diverged = torch.nn.Linear(2, 2)
    diverged.weight.data[0, 0] = float("inf")
    with pytest.raises(CartError, match="the weights are not finite after step 7: training diverged and nothing was "
                                        "saved"):
        train._require_finite_weights(diverged, train.Progress({}, step=7))


def test_a_model_too_large_for_the_machine_is_refused_before_it_is_built(ready_run):
    with pytest.raises(CartError, match=r"the model \(model.d_model=100000000, model.d_ff=64, 2 \+ 2 layers\), its "
                                        r"gradients and AdamW's moments needs about [\d,.]+ GiB, but cpu has [\d,.]+ "
                                        r"GiB free: lower it"):
        train.run(ready_run("model.d_model=100000000"))


def test_a_missing_pretrained_t5_names_its_key(ready_run):
    with pytest.raises(CartError, match="model.pretrained: folder not found: /nope"):
        train.run(ready_run("model.pretrained=/nope"))


def test_epochs_before_validate_from_train_without_validation(ready_run):
    cfg = ready_run("train.epochs=3", "train.validate_from=2", "train.patience=0")
    train.run(cfg)
    log = json.loads((cfg.run_dir / files.TRAIN_LOG).read_text())
    assert [row["epoch"] for row in log["history"]] == [2, 3]
    assert log["best_step"] in [row["step"] for row in log["history"]]


def test_distilled_items_are_drawn_from_the_teachers_top_k_at_its_weights():
    items = torch.eye(8)
    near = torch.nn.functional.normalize(torch.tensor([1.0, 0.5, 0.3, 0, 0, 0, 0, 0]), dim=0)
    vague = torch.nn.functional.normalize(torch.ones(8), dim=0)  # cosine 0.35 to every item: below the gate
    distilled = batches.Distilled(["near", "vague"], torch.stack([near, vague]), items, top_k=3, temperature=0.2,
                               min_cosine=0.5, seed=0)
    assert distilled.texts == ["near"]
    weights = torch.softmax(near[:3] / 0.2, dim=0).numpy()
    draws = np.array([distilled.draw(epoch)[0] for epoch in range(4000)])
    assert distilled.draw(7) == distilled.draw(7) and set(draws) <= {0, 1, 2}
    for row, p in enumerate(weights):  # within 5 standard errors of the teacher's weight
        assert abs((draws == row).mean() - p) <= 5 * np.sqrt(p * (1 - p) / len(draws))


def test_distillation_drops_texts_the_teacher_hesitates_on():
    items = torch.eye(4)
    sure = torch.nn.functional.normalize(torch.tensor([1.0, 0.2, 0, 0]), dim=0)  # margin 0.78
    torn = torch.nn.functional.normalize(torch.tensor([1.0, 0.9, 0, 0]), dim=0)  # margin 0.07
    vectors = torch.stack([sure, torn])
    assert batches.Distilled(["sure", "torn"], vectors, items, 3, 0.2, min_cosine=0.5, seed=0).texts == ["sure", "torn"]
    gated = batches.Distilled(["sure", "torn"], vectors, items, 1, 0.2, min_cosine=0.5, seed=0, min_margin=0.1)
    assert gated.texts == ["sure"] and gated.draw(0) == [0]


def test_level_targets_are_the_teachers_conditionals_along_the_drawn_prefix():
    # tokens (level 0, level 1, EOS) of four items: 0 and 1 share their first token, 2 and 3 theirs
    labels = torch.tensor([[2, 5, 1], [2, 6, 1], [3, 7, 1], [3, 8, 1]])
    distilled = batches.Distilled(["t"], torch.eye(4)[:1], torch.eye(4), top_k=3, temperature=1.0, min_cosine=0,
                                  seed=0)
    distilled.rows, distilled.weights = np.array([[0, 1, 2]]), np.array([[0.5, 0.3, 0.2]])
    # pair 0 is labelled (item 3), pair 1 (row first + 0) is the distilled text, drawn to item 1 this epoch
    targets = distilled.level_targets([4, 10], torch.tensor([3, 1]), first=10, labels=labels, vocab_size=9)
    assert torch.equal(targets[0], torch.nn.functional.one_hot(labels[3], 9).float())
    expected = torch.zeros(3, 9)
    expected[0, 2], expected[0, 3] = 0.8, 0.2  # every candidate
    expected[1, 5], expected[1, 6] = 0.5 / 0.8, 0.3 / 0.8  # those under the drawn item's first token
    expected[2, 1] = 1.0
    assert torch.allclose(targets[1], expected, atol=1e-6)
    drawn_elsewhere = distilled.level_targets([10], torch.tensor([2]), first=10, labels=labels, vocab_size=9)[0]
    assert drawn_elsewhere[1, 7] == 1 and torch.allclose(drawn_elsewhere[0], expected[0])


def test_unlabelled_texts_leave_out_every_text_of_the_corpus(tmp_path):
    records = [{"texts": [{"text": "red heart", "kind": "caption"}, {"text": "Love-Letter", "kind": "query", "set": "A"},
                          {"text": "heart on fire", "kind": "validation"}]}]
    path = tmp_path / "words.txt"
    path.write_text("red heart\nlove letter\nHEART ON FIRE!\n\ncrimson\ncrimson\n  pulse \n---\n", encoding="utf-8")
    assert pairs.unlabelled_texts(path, records) == ["crimson", "pulse"]


def test_distillation_needs_an_encoder_with_a_text_side(ready_run, tmp_path):
    (tmp_path / "words.txt").write_text("crimson\n")
    with pytest.raises(CartError, match="train.distill_texts needs an item encoder with a text side"):
        ready_run(f"train.distill_texts={tmp_path / 'words.txt'}")
    with pytest.raises(CartError, match="train.distill_texts file not found"):
        ready_run(f"train.distill_texts={tmp_path / 'nope.txt'}", "embed.encoder=minilm-text")


def test_query_target_interpolation_moves_the_last_layers_mean_toward_the_target():
    torch.manual_seed(0)
    layers = torch.randn(3, 5, 4, 16)  # (B, T, S, d)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    targets = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    mixed = batches.toward_targets(layers, mask, targets, alpha=1e4)  # Beta(1e4, 1e4): s = 1/2 +- 0.004 everywhere

    def mean(x):
        weights = mask.unsqueeze(-1).float()
        return (x[:, :, -1] * weights).sum(1) / weights.sum(1)

    assert torch.equal(mixed[:, :, :-1], layers[:, :, :-1])  # the layers below the items' space are untouched
    assert torch.equal(mixed[:, :, -1][mask == 0], layers[:, :, -1][mask == 0])  # and so is padding
    step = (mixed - layers)[:, :, -1]
    for row, length in enumerate(mask.sum(1).tolist()):  # every real token moves by the same step
        assert torch.allclose(step[row, :length], step[row, :1].expand(length, -1), atol=1e-5)
    before, after = mean(layers), mean(mixed)
    assert torch.allclose(after.norm(dim=-1), before.norm(dim=-1), rtol=1e-5)
    halfway = torch.nn.functional.normalize(torch.nn.functional.normalize(before, dim=-1) + targets, dim=-1)
    assert (torch.nn.functional.normalize(after, dim=-1) * halfway).sum(-1).min() > 0.999
    gentle = mean(batches.toward_targets(layers, mask, targets, alpha=1e4, share=0.2))  # the item's share 0.1
    q = torch.nn.functional.normalize(before, dim=-1)
    expected = torch.nn.functional.normalize(0.9 ** 0.5 * q + 0.1 ** 0.5 * targets, dim=-1)
    assert (torch.nn.functional.normalize(gentle, dim=-1) * expected).sum(-1).min() > 0.999


def test_query_target_interpolation_needs_frozen_cached_minilm_states_and_minilm_item_embeddings(ready_run):
    with pytest.raises(CartError, match="train.interpolation mixes a query's frozen, cached MiniLM states"):
        ready_run("train.interpolation=2")
    with pytest.raises(CartError, match="train.interpolation mixes"):
        ready_run(*MINILM, "train.interpolation=2")  # the items' embeddings are not MiniLM's
    with pytest.raises(CartError, match="train.interpolation must be at least 0"):
        ready_run("train.interpolation=-1")
    with pytest.raises(CartError, match=r"train.interpolation_share should be in \(0, 1\]"):
        ready_run("train.interpolation_share=0")


def test_splits_config_draws_the_runs_splits_without_its_training_only_inputs(ready_run, tmp_path):
    from cart.config import to_dict

    words = tmp_path / "words.txt"
    words.write_text("crimson\n", encoding="utf-8")
    cfg = ready_run("train.validation_names=2", "train.subset_queries=2", "train.validation_fraction=0.2", "seed=3",
                    "embed.encoder=minilm-text", f"train.distill_texts={words}")
    words.unlink()  # a training input only: where the model is used it may be gone
    records = corpus.read(cfg.run_dir)
    drawn, again = pairs.split_pairs(records, cfg), pairs.split_pairs(records, pairs.splits_config(to_dict(cfg)))
    assert again.train == drawn.train and again.validation == drawn.validation and drawn.validation["names"].texts


@pytest.mark.parametrize("targets", ["draw", "levels"])
def test_distilled_texts_are_trained_on_beside_the_corpus_and_recorded_as_an_input(reranked, tmp_path, targets):
    from cart.data import corpus
    from cart.encoders import embed

    words = tmp_path / "words.txt"  # a training text and a validation query of the corpus, and three new texts
    words.write_text("red number 0\norange item 3\ncrimson\nsquare\nviolet shape\n", encoding="utf-8")
    cfg = reranked(f"output_dir={tmp_path / 'runs'}", f"train.distill_texts={words}", "train.distill_min_cosine=-1",
                   "train.distill_weight=0.5", f"train.distill_targets={targets}")
    for stage in (corpus, embed, build_ids, train):
        stage.run(cfg)
    log = json.loads((cfg.run_dir / files.TRAIN_LOG).read_text())
    assert log["training_pairs"] == len(pairs.split_pairs(corpus.read(cfg.run_dir), cfg).train.texts) + 3
    assert files.read_manifest(cfg.run_dir / files.MODEL_WEIGHTS)["inputs"]["distill_texts"] == files.sha256_file(words)
    words.unlink()  # training's input only: the model is used without it
    assert len(Retriever.load(cfg.run_dir).search(["red number 0"], k=3)[0]) == 3


def test_query_target_interpolation_mixes_every_training_batch_toward_its_items(reranked, tmp_path, monkeypatch):
    from cart.data import corpus
    from cart.encoders import embed
    from cart.retrieve.rerank import item_embeddings

    calls = []

    def spy(layers, mask, targets, alpha, share):
        calls.append((targets, alpha, share))
        return mix(layers, mask, targets, alpha, share)

    mix = batches.toward_targets
    monkeypatch.setattr(batches, "toward_targets", spy)
    cfg = reranked(f"output_dir={tmp_path / 'runs'}", "model.encoder=minilm", "model.d_model=384", "model.num_heads=6",
                   "model.d_ff=64", "model.num_decoder_layers=1", "model.freeze_encoder=true", "train.interpolation=2",
                   "retrieve.rerank=false", "train.interpolation_share=0.5")
    for stage in (corpus, embed, build_ids, train):
        stage.run(cfg)
    items = item_embeddings(cfg.run_dir)
    assert len(calls) >= cfg.train.epochs and all((alpha, share) == (2, 0.5) for _, alpha, share in calls)
    for targets, _, _ in calls:  # each query mixed toward an item's own embedding, a row of them as it is
        assert (targets.unsqueeze(1) == items.unsqueeze(0)).all(-1).any(1).all()
    assert files.EMBEDDINGS in files.read_manifest(cfg.run_dir / files.MODEL_WEIGHTS)["inputs"]  # a model input
