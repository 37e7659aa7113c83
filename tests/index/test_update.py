"""`cart add` and `cart remove`: items into a trained run without training, out of it; never half-written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cart import cli, files
from cart.errors import CartError
from cart.index import identifiers
from cart.index.build_ids import load as load_ids
from cart.retrieve.retriever import Retriever
from tests.conftest import COLOURS, make_media, write_jsonl

RUN_FILES = (files.CORPUS, files.EMBEDDINGS, files.IDS, files.TRIE, files.IDS_STATS, files.IDS_PLOT)


@pytest.fixture
def run(reranked, tmp_path):
    """A copy of the shared tiny trained run (MiniLM item text, rerank), free to change."""
    source = reranked().run_dir
    copy = tmp_path / "run"
    shutil.copytree(source, copy, symlinks=True, ignore=shutil.ignore_patterns("state", files.LOCK))
    return copy


def new_items(folder, count: int = 3, start: int = 100, **change) -> str:
    """A manifest of `count` new items (ids new<start>...) with their media under `folder`; `change`
    replaces fields of every row."""
    make_media(folder)
    rows = [{"id": f"new{i}", "path": f"media/img{i % 6}.png",
             "texts": [f"violet spiral {i}", f"spiral {i}", {"text": f"a violet spiral {i}", "kind": "query", "set": "A"}]}
            | change for i in range(start, start + count)]
    return str(write_jsonl(folder / "new.jsonl", rows))


def snapshot(run_dir) -> dict:
    """Every file of the run folder but the lock, and its bytes' digest (the model's folder included)."""
    return {str(p.relative_to(run_dir)): files.sha256_file(p) for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != files.LOCK}


def cart(*argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
        raise SystemExit(0)
    return exit_.value.code


def test_added_items_are_found_and_the_model_is_untouched(run, tmp_path, capsys):
    model_before = {k: v for k, v in snapshot(run).items() if k.startswith(files.MODEL)}
    shutil.copytree(run, run.parent / "before", symlinks=True)
    before = Retriever.load(run, rerank=True)
    assert cart("add", "--run", str(run), "--corpus", new_items(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "add: added 3 items: 12 -> 15 in the run" in out and "new101" in out
    assert {k: v for k, v in snapshot(run).items() if k.startswith(files.MODEL)} == model_before
    retriever = Retriever.load(run, rerank=True, rerank_candidates=15)
    assert len(retriever.records) == 15 and retriever.records[-1]["id"] == "new102"
    codes = load_ids(run).codes
    assert len({tuple(row) for row in codes.tolist()}) == 15  # every identifier names one item
    assert (codes[:12] == before.ids.codes).all()  # the trained items keep theirs
    # each new item is reachable: its own identifier decodes to it, and its text finds it with rerank
    assert (retriever.ids.trie.item_of(retriever.ids.tokens[12:]) == np.arange(12, 15)).all()
    hits = retriever.search(["violet spiral 101"], k=15)[0]
    assert "new101" in [h.id for h in hits[:3]]
    # untrained, they join rerank's candidates beside the trained item the beam finds under their prefix
    sibling = next(row for row in range(12) if (codes[row, :-1] == codes[13, :-1]).all())
    under = [row for row in range(12, 15) if (codes[row, :-1] == codes[13, :-1]).all()]
    query = ["violet spiral 101"]
    vectors = retriever.reranker.query_vectors(query)
    retriever.untrained_by_cosine = 0
    rows, scores = retriever._with_untrained(query, vectors, np.array([[sibling, -1]]),
                                             np.array([[-1.5, -np.inf]], dtype=np.float32))
    assert rows[0, :2].tolist() == [sibling, -1] and sorted(rows[0, 2:].tolist()) == under
    assert (scores[0, 2:] == -1.5).all()
    # the model scores each trained item's identifier as before
    queries, rows = ["red number 0", "shape 7"], np.arange(12)
    pure_before, pure_after = Retriever.load(run.parent / "before", rerank=False), Retriever.load(run, rerank=False)
    assert np.array_equal(pure_before.score_rows(queries, rows), pure_after.score_rows(queries, rows))
    # manifests name the versions they extend; the model still names the ones it was trained on
    corpus_manifest = files.read_manifest(run / files.CORPUS)
    assert corpus_manifest["stage"] == "add" and len(corpus_manifest["extends"]) == 1
    ids_manifest = files.read_manifest(run / files.IDS)
    model_manifest = files.read_manifest(run / files.MODEL_WEIGHTS)
    assert model_manifest["inputs"][files.IDS] == ids_manifest["extends"][0] != ids_manifest["sha256"]


def test_untrained_items_most_similar_to_the_query_join_the_candidates(run, tmp_path):
    assert cart("add", "--run", str(run), "--corpus", new_items(tmp_path)) == 0
    retriever = Retriever.load(run, rerank=True, untrained_by_cosine=2)
    items = retriever.reranker.items
    # each untrained row's stand-in is the trained row whose embedding is most similar
    assert retriever.untrained_rows.tolist() == [12, 13, 14]
    assert retriever.stand_ins.tolist() == (items[12:] @ items[:12].T).argmax(dim=1).tolist()
    queries = ["violet spiral 101", "red number 0"]
    vectors = retriever.reranker.query_vectors(queries)
    expected = (vectors @ items[12:].T).topk(2, dim=1).indices.numpy() + 12
    beam = np.array([[0], [1]])  # a trained row whose prefix holds none of them
    retriever.untrained = {}
    rows, scores = retriever._with_untrained(queries, vectors, beam, np.array([[-0.5], [-0.5]], dtype=np.float32))
    # scored as the stand-in: its identifier's log-probability under the model (pure CART's score_rows)
    exact = Retriever.load(run, rerank=False).score_rows(queries, retriever.stand_ins)
    for q in range(2):
        assert rows[q, 0] == beam[q, 0] and rows[q, 1:].tolist() == expected[q].tolist()
        assert np.allclose(scores[q, 1:], exact[q, expected[q] - 12], atol=1e-4)
    # a pick the beam already has keeps the beam's score; none are added with the setting at 0
    rows, scores = retriever._with_untrained(queries[:1], vectors[:1], expected[:1, :1], np.array([[-0.25]], dtype=np.float32))
    assert rows[0, 0] == expected[0, 0] and scores[0, 0] == np.float32(-0.25) and rows[0, 1:].tolist() == expected[0, 1:].tolist()
    retriever.untrained_by_cosine = 0
    rows, _ = retriever._with_untrained(queries, vectors, beam, np.array([[-0.5], [-0.5]], dtype=np.float32))
    assert rows.tolist() == beam.tolist()
    for bad in (-1, 1.5, True):  # a bad count from the Python API: one line, not a traceback from topk
        with pytest.raises(CartError, match="untrained_by_cosine must be a whole number, at least 0"):
            Retriever.load(run, rerank=True, untrained_by_cosine=bad)
    # through search, with no prefix expansion at all: the query's own new item comes back
    retriever.untrained_by_cosine = 2
    assert "new101" in [hit.id for hit in retriever.search(["violet spiral 101"], k=5)[0]]


def test_a_second_add_and_a_rebuild_of_the_identifiers_needs_force(run, tmp_path, reranked):
    from cart.index import build_ids

    assert cart("add", "--run", str(run), "--corpus", new_items(tmp_path)) == 0
    assert cart("add", "--run", str(run), "--corpus", new_items(tmp_path / "b", start=200)) == 0
    assert len(files.read_manifest(run / files.IDS)["extends"]) == 2
    Retriever.load(run)  # the model trained on the first version still fits the third
    with pytest.raises(CartError, match="model/model.safetensors"):  # built from an earlier version: not silently stale
        build_ids.run(reranked(f"output_dir={run.parent}", f"run={run.name}"))


@pytest.mark.parametrize("change, message", [
    ({"id": "item3"}, "duplicate item id 'item3'"),
    ({"path": "missing.png"}, "missing media file"),
    ({"texts": []}, "no text"),
])
def test_bad_new_items_change_nothing(run, tmp_path, capsys, change, message):
    before = snapshot(run)
    path = new_items(tmp_path, **change)
    assert cart("add", "--run", str(run), "--corpus", path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "new.jsonl line 1" in err
    assert snapshot(run) == before


def test_dry_run_writes_nothing(run, tmp_path, capsys):
    before = snapshot(run)
    assert cart("add", "--run", str(run), "--corpus", new_items(tmp_path), "--dry-run") == 0
    assert "add: would have added 3 items" in capsys.readouterr().out
    assert cart("remove", "--run", str(run), "item1", "--dry-run") == 0
    assert "remove: would have removed 1 items" in capsys.readouterr().out
    assert snapshot(run) == before


def test_removed_items_are_never_returned(run, capsys):
    assert cart("remove", "--run", str(run), "item1", "item4") == 0
    retriever = Retriever.load(run, rerank=True, rerank_candidates=10)
    assert len(retriever.records) == 10
    queries = [f"{c} number {i}" for i, c in enumerate(COLOURS * 2)] + ["shape 1", "shape 4"]
    for rerank in (False, True):
        rows, _ = retriever.search_rows(queries, 10, rerank=rerank)
        found = {retriever.records[r]["id"] for r in rows.ravel() if r >= 0}
        assert not found & {"item1", "item4"} and len(found) == 10
    assert cart("remove", "--run", str(run), "item1") == 2
    assert "no item 'item1'" in capsys.readouterr().err


def test_a_kill_leaves_the_old_run_or_the_new_one(run, tmp_path, monkeypatch):
    from cart.index import update

    before = snapshot(run)
    # killed before the journal: only the staged folder is left, and the run is as it was
    monkeypatch.setattr(files, "write_text", _killed_at(files.JOURNAL, files.write_text))
    with pytest.raises(KeyboardInterrupt):
        with files.run_lock(run, "cart add"):
            update.add(run, [f"corpus.path={new_items(tmp_path / 'a')}", "corpus.source=manifest"])
    monkeypatch.undo()
    assert (run / files.STAGED).is_dir() and not (run / files.JOURNAL).exists()
    assert {k: v for k, v in snapshot(run).items() if not k.startswith(files.STAGED)} == before
    Retriever.load(run)
    # killed after the journal, between two of the renames: the next reader finishes them
    renamed, real_replace = [], os.replace

    def replace(source, target):  # the journal's renames: the second one is never made
        if Path(target).parent == run and Path(source).parent.name == files.STAGED:
            if renamed:
                raise KeyboardInterrupt
            renamed.append(target)
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with files.run_lock(run, "cart add"):
            update.add(run, [f"corpus.path={new_items(tmp_path / 'b')}", "corpus.source=manifest"])
    monkeypatch.undo()
    assert (run / files.JOURNAL).exists()
    retriever = Retriever.load(run)  # settles first: every file of the new version
    assert len(retriever.records) == 15 and not (run / files.JOURNAL).exists() and not (run / files.STAGED).exists()


def _killed_at(name, write):
    def write_text(path, text):
        if path.name == name:
            raise KeyboardInterrupt
        return write(path, text)
    return write_text


def test_new_items_take_their_most_similar_items_prefix_and_a_free_counter(run):
    from safetensors.torch import load_file

    ids = load_ids(run)
    x = load_file(str(run / files.EMBEDDINGS))["embeddings"]
    counters = ids.layout.level_sizes[-1]
    # the trained items' own embeddings as new items: each its own prefix (its most similar item is itself),
    # under a counter no identifier used
    again, moved = identifiers.code_new_items(x, x, ids.codes, counters + len(x))
    assert (again[:, :-1] == ids.codes[:, :-1]).all() and not moved.any()
    assert not {tuple(r) for r in ids.codes.tolist()} & {tuple(r) for r in again.tolist()}
    assert len({tuple(r) for r in again.tolist()}) == len(again)
    # one free counter a prefix (every item at counter 0 of 2): a second copy of an item goes under the prefix
    # of its next most similar item that has room
    full = np.c_[ids.codes[:, :-1], np.zeros(len(x), dtype=np.int64)]
    twice, moved = identifiers.code_new_items(x[:1].repeat(2, 1), x, full, 2)
    assert (twice[0, :-1] == ids.codes[0, :-1]).all() and (twice[:, -1] == 1).all()
    assert tuple(twice[1, :-1]) != tuple(twice[0, :-1]) and moved.tolist() == [False, True]
    prefixes = len({tuple(r) for r in full[:, :-1].tolist()})
    with pytest.raises(ValueError, match="every counter"):
        identifiers.code_new_items(x[:1].repeat(prefixes + 1, 1), x, full, 2)


def test_continued_training_goes_on_from_the_model_on_the_added_items(run, tmp_path, reranked, capsys):
    from cart import train

    cfg = reranked(f"output_dir={run.parent}", f"run={run.name}", "train.epochs=1", "train.validate_from=1")
    with pytest.raises(CartError, match="no item was added"):
        train.run(cfg, continue_training=True)
    previous = files.read_manifest(run / files.MODEL_WEIGHTS)
    assert cart("add", "--run", str(run), "--corpus", new_items(tmp_path)) == 0
    capsys.readouterr()
    train.run(cfg, continue_training=True)
    from cart.data import corpus, pairs

    records = corpus.read(run)
    every = pairs.split_pairs(records, cfg, pairs.held_out_rows(records, previous["held_out_texts"])).train
    new = sum(row >= 12 for row in every.items)
    assert f"train: {2 * new} training pairs" in capsys.readouterr().out  # the new items' and as many old (replay 1)
    manifest = files.read_manifest(run / files.MODEL_WEIGHTS)
    assert manifest["continued_from"] == previous["sha256"] and manifest["trained_added"] == ["new100", "new101", "new102"]
    assert manifest["held_out_texts"] == previous["held_out_texts"]
    assert manifest["inputs"][files.IDS] == files.read_manifest(run / files.IDS)["sha256"]
    assert len(Retriever.load(run).records) == 15
    with pytest.raises(CartError, match="no item was added"):  # each added item is trained on once
        train.run(cfg, continue_training=True)


def test_bad_commands_are_one_line_errors(run, tmp_path, capsys):
    before = snapshot(run)
    (tmp_path / "data.json").write_text("{}", encoding="utf-8")
    manifest = new_items(tmp_path)
    for argv, message in [
        (["add", "--run", str(tmp_path / "nowhere"), "--corpus", manifest], "run folder not found"),
        (["add", "--run", str(run), "--corpus", str(tmp_path / "data.json")], "say how to read it with --source"),
        (["add", "--run", str(run), "--corpus", manifest, "train.epochs=3"], "corpus.* settings only"),
        (["add", "--run", str(run), "--corpus", manifest, "corpus.on_bad=maybe"], "corpus.on_bad"),
        (["add", "--run", str(run), "--corpus", str(tmp_path / "missing.jsonl")], "corpus.path not found"),
        (["remove", "--run", str(run), "item1", "nothing", "nought"], "no item 'nothing'"),
    ]:
        assert cart(*argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert snapshot(run) == before
