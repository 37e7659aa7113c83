"""`cart eval` on a tiny trained run: its files and report, the scoring rule, CART beside the rerank."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cart import files
from cart.errors import CartError
from cart.eval import evaluate, report
from cart.retrieve import scoring
from conftest import ROOT, launch_two_processes, one_thread

PYTHON = sys.executable


def test_eval_writes_metrics_hits_and_a_report_that_agree(trained):
    cfg = trained()
    evaluate.run(cfg)
    summary = json.loads((cfg.run_dir / files.EVAL).read_text())
    assert set(summary["methods"]) == {"CART", "BM25"}
    hits = [json.loads(line) for line in (cfg.run_dir / files.HITS).read_text().splitlines()]
    assert len(hits) == 6 and {h["set"] for h in hits} == {"test"}  # items 10 and 11, three texts each
    for method in ("CART", "BM25"):
        figures = summary["methods"][method]["test"]
        ranks = np.array([h[method]["rank"] for h in hits])
        assert figures["R@1"] == pytest.approx(np.mean(ranks == 1), abs=1e-4)
        assert figures["R@10"] == pytest.approx(np.mean(ranks > 0), abs=1e-4)
        assert figures["MRR@10"] == pytest.approx(np.mean(np.where(ranks > 0, 1 / np.maximum(ranks, 1), 0)), abs=1e-4)
        assert summary["methods"][method]["latency_ms_batch_1"]["queries"] == 3
    for h in hits:
        right = set(h["relevant"])
        assert h["source"] in right
        first = next((i for i, x in enumerate(h["CART"]["ids"], 1) if x in right), 0)
        assert h["CART"]["rank"] == first
    report = (cfg.run_dir / files.REPORT).read_text()
    assert "data:image/png;base64," in report and "<td class=q>CART</td>" in report
    assert json.loads(files.manifest_path(cfg.run_dir / files.EVAL).read_text())["stage"] == "eval"


def test_two_gloo_processes_evaluate_the_same_rankings_as_one(trained):
    """Each method's queries split over 2 processes (a shard of 2 queries each), merged in order."""
    source = trained().run_dir
    settings = ["eval.batch_size=1", "eval.save_every=2", "eval.latency_queries=1"]
    for name in ("eval-one", "eval-two"):
        shutil.copytree(source, source.with_name(name), ignore=shutil.ignore_patterns(files.EVAL, files.HITS))
    with one_thread():
        evaluate.run(trained(*settings, "run=eval-one"))
    done = launch_two_processes("eval", "--config", str(ROOT / "configs/tiny.yaml"), *trained.overrides, *settings,
                                "run=eval-two", port=29520)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "shards of 2 items over 2 processes" in done.stdout
    one, two = (source.with_name(name) for name in ("eval-one", "eval-two"))
    assert (two / files.HITS).read_bytes() == (one / files.HITS).read_bytes()
    methods = json.loads((two / files.EVAL).read_text())["methods"]
    assert {m: {k: v for k, v in sets["test"].items() if k != "queries_per_second"} for m, sets in methods.items()} == {
        m: {k: v for k, v in sets["test"].items() if k != "queries_per_second"}
        for m, sets in json.loads((one / files.EVAL).read_text())["methods"].items()}
    assert not (two / files.EVAL_PARTIAL).exists()


def test_eval_needs_ten_beams(trained):
    with pytest.raises(CartError, match="needs at least 10 beams"):
        evaluate.run(trained("retrieve.beam_width=5"))


def test_scoring_rule_counts_the_source_and_items_named_by_the_query():
    records = [
        {"texts": [{"text": "dog", "kind": "caption"}, {"text": "Dog face", "kind": "query", "set": "A"},
                   {"text": "pup", "kind": "query", "set": "B"}]},
        {"texts": [{"text": "dog face", "kind": "caption"}, {"text": "dog", "kind": "query", "set": "A"}]},
        {"texts": [{"text": "pup", "kind": "caption"}, {"text": "cat", "kind": "query", "set": "A"}]},
    ]
    sets = evaluate.held_out_queries(records)
    assert sets == {"A": [("Dog face", 0), ("dog", 1), ("cat", 2)], "B": [("pup", 0)]}
    relevant = evaluate.relevant_items(records, sets, ["caption", "query:A"])
    assert relevant == {"A": [{0, 1}, {0, 1}, {2}], "B": [{0, 2}]}
    assert evaluate.relevant_items(records, sets, ["caption"])["A"] == [{0, 1}, {0, 1}, {2}]
    assert evaluate.relevant_items(records, sets, [])["B"] == [{0}]
    rows = np.array([[5, 0, 1], [1, 2, 3], [7, 8, 2]])
    assert scoring.first_right(rows, relevant["A"]).tolist() == [2, 1, 3]
    m = scoring.metrics(rows, relevant["A"])
    assert m["R@1"] == pytest.approx(1 / 3, abs=1e-4) and m["R@5"] == 1.0
    assert m["MRR@10"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3, abs=1e-4)


def test_cli_eval_runs_from_the_command_line(trained):
    cfg = trained()
    out = subprocess.run([PYTHON, "-m", "cart", "eval", "--config", str(ROOT / "configs/tiny.yaml"),
                          *trained.overrides, "eval.baselines=[]"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "CART" in out.stdout and "report ->" in out.stdout
    assert set(json.loads((cfg.run_dir / files.EVAL).read_text())["methods"]) == {"CART"}


def test_eval_reports_cart_and_cart_with_rerank_side_by_side(reranked):
    cfg = reranked()
    evaluate.run(cfg)
    summary = json.loads((cfg.run_dir / files.EVAL).read_text())
    assert list(summary["methods"]) == ["CART", "CART + rerank"]
    assert "CART + rerank" in report.table(summary)
    # the beam's ten candidates, re-ordered: the same items within the top 10
    assert summary["methods"]["CART + rerank"]["A"]["R@10"] == summary["methods"]["CART"]["A"]["R@10"]
