"""Retrieval on a tiny trained run: the Python API, `cart retrieve`, the rerank and the baselines."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cart import files, train
from cart.data import pairs
from cart.errors import CartError
from cart.eval import evaluate
from cart.index import build_ids
from cart.retrieve import baselines
from cart.retrieve.retriever import Retriever
from conftest import prepare_run

PYTHON = sys.executable


def test_retriever_returns_ranked_real_items_and_answers_many_calls(trained):
    cfg = trained()
    retriever = Retriever.load(cfg.run_dir)
    records = retriever.records
    results = retriever.search(["red number 0", "shape 3", "green thing 1"], k=5)
    assert len(results) == 3
    for hits in results:
        assert 1 <= len(hits) <= 5
        assert all(records[h.row]["id"] == h.id and records[h.row]["path"] == h.path for h in hits)
        assert len({h.id for h in hits}) == len(hits)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    alone = retriever.search("shape 3", k=5)[0]  # one string, same answer, same loaded model
    assert [h.row for h in alone] == [h.row for h in results[1]]
    # the same float32 sums in another order (a batch of one, not three padded queries)
    assert np.allclose([h.score for h in alone], [h.score for h in results[1]], rtol=1e-5, atol=0)
    # more beams than items: every item comes back once, the rest are marked missing, never NaN
    rows, scores = Retriever.load(cfg.run_dir, beam_width=16).search_rows(["shape 3"], k=16)
    found = rows[0][rows[0] >= 0]
    assert sorted(found.tolist()) == list(range(len(records)))
    assert np.isfinite(scores[0][: len(found)]).all() and np.isneginf(scores[0][len(found):]).all()


def test_retriever_errors_are_clear(trained, tmp_path):
    cfg = trained()
    retriever = Retriever.load(cfg.run_dir)
    with pytest.raises(CartError, match="query 2 is empty"):
        retriever.search(["red", "  "])
    with pytest.raises(CartError, match="k=11 is larger than the beam width 10"):
        retriever.search(["red"], k=11)
    with pytest.raises(CartError, match="run folder not found"):
        Retriever.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CartError, match="model.safetensors is missing: run `cart train` first"):
        Retriever.load(tmp_path / "empty")


def test_a_model_of_other_identifiers_is_refused_at_load(tmp_path):
    config = prepare_run(tmp_path)
    train.run(config("train.epochs=1"))
    build_ids.run(config("ids.codebook_size=3"), force=True)
    with pytest.raises(CartError, match="was built from another ids.safetensors"):
        Retriever.load(config().run_dir)


def test_cli_retrieve_prints_a_table_json_and_reads_stdin(trained):
    run_dir = str(trained().run_dir)
    table = subprocess.run([PYTHON, "-m", "cart", "retrieve", "--run", run_dir, "-k", "3", "red number 0"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert table[0] == "red number 0" and len(table) == 4 and table[1].split()[0] == "1"
    out = subprocess.run([PYTHON, "-m", "cart", "retrieve", "--run", run_dir, "--json", "-k", "2"],
                         input="shape 1\n\ngreen thing 0\n", capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["query"] for r in rows] == ["shape 1", "green thing 0"]
    assert all(len(r["hits"]) == 2 and set(r["hits"][0]) == {"id", "path", "score", "row"} for r in rows)
    bad = subprocess.run([PYTHON, "-m", "cart", "retrieve", "--run", run_dir, "-k", "12", "red"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "cart retrieve: error: k=12 is larger than the beam width 10: pass a larger beam width")
    # a reader that goes away (`| head -1`) ends it quietly
    reader = subprocess.Popen([PYTHON, "-m", "cart", "retrieve", "--run", run_dir, "--file", "-"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader.stdin.write("red number 0\n" * 200)  # 200 x 5 lines of about 100 bytes: more than a pipe holds
    reader.stdin.close()
    assert reader.stdout.readline() == "red number 0\n"
    reader.stdout.close()
    assert reader.wait(timeout=120) == 1 and reader.stderr.read() == ""


def emoji_like_records():
    tags = [["dog", "pet"], ["cat", "kitten", "pet"], ["pizza", "food"], ["rocket", "space"]]
    return [{"texts": [{"text": t, "kind": "caption"} for t in dict.fromkeys(ts + [" ".join(ts)])]} for ts in tags]


def test_an_items_document_drops_texts_contained_in_another():
    assert pairs.item_document(emoji_like_records()[1]) == "cat kitten pet"
    record = {"texts": [{"text": "a red bus", "kind": "caption"}, {"text": "bus", "kind": "generated"},
                        {"text": "a bus in town", "kind": "caption"}, {"text": "red", "kind": "query", "set": "A"}]}
    assert pairs.item_document(record) == "a red bus a bus in town"
    # a word inside another word is not part of it: "card" stays beside "wildcard" (a substring test dropped it)
    assert pairs.item_document({"texts": [{"text": "card", "kind": "caption"}, {"text": "wildcard", "kind": "caption"},
                                         {"text": "Card game", "kind": "caption"}]}) == "wildcard Card game"


def test_bm25_and_minilm_find_the_item_a_query_describes():
    records = emoji_like_records()
    rows, scores = baselines.BM25(records).search(["kitten", "food", "unknown words", "PET"], k=4)
    assert rows[0, 0] == 1 and rows[1, 0] == 2
    assert rows[2].tolist() == [0, 1, 2, 3]  # nothing matches: every score ties, corpus order
    assert set(rows[3, :2].tolist()) == {0, 1} and scores[3, 0] > scores[3, 2]
    rows, scores = baselines.MiniLM(records).search(["a puppy", "spaceship launch", "a slice of pepperoni"], k=2)
    assert rows[:, 0].tolist() == [0, 3, 2]
    assert np.all(scores[:, 0] >= scores[:, 1]) and np.all(scores <= 1 + 1e-5)


def test_cross_modal_baseline_ranks_by_cosine_of_the_text_tower():
    class TextTower:
        def encode_text(self, texts):
            return torch.tensor([[1.0, 0.0] if t == "east" else [0.0, 1.0] for t in texts])

    items = torch.tensor([[0.0, 2.0], [3.0, 0.1], [1.0, 1.0]])
    rows, scores = baselines.CrossModal(items, TextTower()).search(["east", "north"], k=3)
    assert rows.tolist() == [[1, 2, 0], [0, 2, 1]]
    assert scores[0, 0] == pytest.approx(3 / np.hypot(3, 0.1), abs=1e-6)


def test_dense_baseline_needs_a_text_tower(trained):
    assert evaluate._baseline("dense", [], trained()) is None  # precomputed embeddings: no text tower
    with pytest.raises(CartError, match="unknown baseline 'bm26'"):
        evaluate._baseline("bm26", [], trained())


def test_beam_width_one_is_greedy_search_with_the_models_own_score(trained):
    retriever = Retriever.load(trained().run_dir, beam_width=1)
    queries = ["red number 0", "shape 3", "green thing 1"]
    rows, scores = retriever.search_rows(queries, k=1)
    assert (rows >= 0).all() and np.isfinite(scores).all()
    # the score is the identifier's log-probability under the model, as beam search reports it
    encoded = retriever.tokenizer(queries, padding=True, return_tensors="pt")
    labels = torch.cat([torch.from_numpy(retriever.ids.tokens[rows[:, 0]]),
                        torch.full((len(queries), 1), build_ids.TokenLayout.EOS)], dim=1)
    with torch.no_grad():
        logits = retriever.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                 labels=labels).logits
    expected = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(1)
    assert torch.allclose(torch.from_numpy(scores[:, 0]), expected, atol=1e-4)
    done = subprocess.run([PYTHON, "-m", "cart", "retrieve", "--run", str(trained().run_dir), "--beams", "1", "-k", "1",
                           "red number 0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2


def test_scoring_any_item_gives_what_beam_search_reports_for_the_items_it_finds(trained):
    retriever = Retriever.load(trained().run_dir, rerank=False)
    queries = ["red number 0", "shape 3"]
    rows, scores = retriever.search_rows(queries, k=5)
    every = retriever.score_rows(queries, np.arange(len(retriever.records)))  # (2, 12): found or not
    assert every.shape == (2, 12) and np.isfinite(every).all()
    for q in range(2):
        assert np.allclose(every[q, rows[q]], scores[q], atol=1e-4)
    assert np.allclose(retriever.score_rows(queries[:1], [3, 3, 0]), every[:1, [3, 3, 0]], atol=1e-5)


def test_api_refuses_zero_k_beams_and_batch_size(trained):
    run_dir = trained().run_dir
    retriever = Retriever.load(run_dir)
    with pytest.raises(CartError, match="k must be at least 1, got 0"):
        retriever.search("red", k=0)
    with pytest.raises(CartError, match="batch size must be at least 1, got 0"):
        retriever.search("red", batch_size=0)
    with pytest.raises(CartError, match="k must be a whole number, got 2.5"):
        retriever.search("red", k=2.5)
    with pytest.raises(CartError, match="batch_size must be a whole number, got '8'"):
        retriever.search("red", batch_size="8")
    with pytest.raises(CartError, match="queries must be a list of texts, got int"):
        retriever.search(3)
    with pytest.raises(CartError, match="beam width must be at least 1, got 0"):
        Retriever.load(run_dir, beam_width=0)


def test_a_query_the_tokenizer_cannot_read_is_flagged(trained):
    retriever = Retriever.load(trained().run_dir)
    assert retriever.reads("red number 0") and retriever.reads("red 日本")
    assert not retriever.reads("\U0001f431 \U0001f680") and not retriever.reads("\U00020000\U00020001")  # emoji, rare CJK
    assert not retriever.reads("[CLS] [SEP]") and not retriever.reads("[UNK][PAD]")  # special tokens only
    done = subprocess.run([PYTHON, "-m", "cart", "retrieve", "--run", str(trained().run_dir), "--json", "-k", "2",
                           "\U0001f431\U0001f680", "red"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert "knows no word of the query '\U0001f431\U0001f680'" in rows[0]["warning"] and "warning" not in rows[1]
    assert done.stderr.strip().splitlines() == [f"cart retrieve: warning: {rows[0]['warning']}"]


@pytest.mark.parametrize("name", ["model/config.json", "model/tokenizer.json", "model/tokenizer_config.json"])
def test_every_file_of_the_model_folder_is_verified(tmp_path, name):
    config = prepare_run(tmp_path)
    train.run(config("train.epochs=1"))
    run_dir = config().run_dir
    path = run_dir / name
    path.write_text(path.read_text().replace('"', '"', 1) + " ")
    with pytest.raises(CartError, match=f"{name} is missing or does not match model.safetensors's manifest"):
        Retriever.load(run_dir)
    path.unlink()
    with pytest.raises(CartError, match=f"{name} is missing"):
        Retriever.load(run_dir)


def test_an_extra_file_in_the_model_folder_is_refused(tmp_path):
    config = prepare_run(tmp_path)
    train.run(config("train.epochs=1"))
    run_dir = config().run_dir
    (run_dir / "model/special_tokens_map.json").write_text("{}")
    with pytest.raises(CartError, match="special_tokens_map.json is not one of the files the model was saved with"):
        Retriever.load(run_dir)


def test_rerank_weights_are_chosen_on_validation_and_reorder_the_beam(reranked):
    from cart.config import load_config
    from cart.retrieve import baselines
    from cart.retrieve.rerank import LEXICAL_WEIGHTS, WEIGHTS

    run_dir = reranked().run_dir
    log = json.loads((run_dir / files.TRAIN_LOG).read_text())
    assert all(set(row["validation"]) == {"V", "texts"} for row in log["history"])  # the corpus's own split too
    # the weights are chosen once training ends, for the kept model, and written into its manifest
    chosen = log["rerank"]
    assert chosen["weight"] in WEIGHTS and chosen["lexical_weight"] in LEXICAL_WEIGHTS
    assert set(chosen) == {"weight", "lexical_weight", "V", "texts"}
    retriever = Retriever.load(run_dir)
    assert (retriever.manifest["rerank_weight"], retriever.manifest["rerank_lexical_weight"]) == (
        chosen["weight"], chosen["lexical_weight"])
    reranker = retriever.reranker
    assert (reranker.weight, reranker.lexical_weight) == (chosen["weight"], chosen["lexical_weight"])
    reranker.weight, reranker.lexical_weight = 0.1, 0.5  # both terms at work, whatever training chose
    queries = ["red number 0", "shape 3", "green thing 1"]
    beam_rows, beam_scores = retriever.search_rows(queries, 10, rerank=False)
    rows, scores = retriever.search_rows(queries, 5, rerank=True)
    # BM25 over the training texts training used: the texts validation held out are not in it
    records = retriever.records
    stored = retriever.manifest["config"]
    cfg = load_config(None, [f"train={json.dumps(stored['train'])}", f"seed={stored['seed']}"])
    bm25 = baselines.BM25(pairs.without_texts(records, pairs.held_out_texts(records, cfg))).scores(queries)
    q = reranker.encoder.encode_text(queries)
    for i in range(3):
        found = beam_rows[i][beam_rows[i] >= 0]
        lexical = bm25[i][found] / max(bm25[i][found].max(), 1e-9)
        expected = (reranker.items[found] @ q[i]).numpy() + 0.1 * beam_scores[i][: len(found)] + 0.5 * lexical
        order = np.argsort(-expected, kind="stable")[:5]
        assert rows[i][: len(order)].tolist() == found[order].tolist()
        assert np.allclose(scores[i][: len(order)], expected[order], atol=1e-5)


def test_rerank_reorders_the_candidates_of_a_wider_beam_of_its_own(reranked):
    from cart.data import corpus
    from cart.encoders import embed

    wide = reranked("run=wide", "retrieve.rerank_candidates=12")
    for stage in (corpus, embed, build_ids, train):  # the weight is chosen on the rerank's 12 beams
        stage.run(wide)
    retriever = Retriever.load(wide.run_dir)
    assert retriever.manifest["rerank_weight"] == json.loads((wide.run_dir / files.TRAIN_LOG).read_text())["rerank"]["weight"]
    assert (retriever.beam_width, retriever.rerank_candidates) == (10, 12)
    queries = ["red number 0", "shape 3"]
    rows, _ = retriever.search_rows(queries, 12, rerank=True)
    wider, _ = Retriever.load(wide.run_dir, beam_width=12).search_rows(queries, 12, rerank=False)
    assert all(sorted(r[r >= 0]) == sorted(w[w >= 0]) for r, w in zip(rows, wider))  # the same 12 candidates
    assert retriever.search_rows(queries, 10, rerank=False)[0].shape == (2, 10)  # pure CART: its own 10 beams
    with pytest.raises(CartError, match="k=13 is larger than the beam width 12"):
        retriever.search_rows(queries, 13, rerank=True)
    with pytest.raises(CartError, match=r"retrieve.rerank_candidates \(8\) must be at least retrieve.beam_width"):
        reranked("retrieve.rerank_candidates=8")
    files.update_manifest(wide.run_dir / files.MODEL_WEIGHTS, rerank_weight=None)  # killed before the weight
    with pytest.raises(CartError, match="has no rerank weight yet .*: run `cart train` again to finish"):
        Retriever.load(wide.run_dir)
    train.run(wide)  # resumed: training is over, the weight is chosen again
    assert Retriever.load(wide.run_dir).manifest["rerank_weight"] is not None


def test_rerank_needs_a_weight_chosen_in_training_and_a_text_side(trained):
    with pytest.raises(CartError, match="was trained without a rerank weight: train with retrieve.rerank=true"):
        Retriever.load(trained().run_dir, rerank=True)
    with pytest.raises(CartError, match="retrieve.rerank needs an item encoder with a text side"):
        trained("retrieve.rerank=true")  # the tiny run's embeddings are precomputed: no text side
