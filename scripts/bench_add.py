"""How well items that no training saw are found after `cart add` (issue 27), on the emoji benchmark.

For each share (10%, and 50% for a harder row): hold out that share of the items, stratified by CLDR group
with the config's seed; train on the rest with the real stages (`cart corpus`, `embed`, `ids`, `train`);
score the set A and B queries of the trained items; `cart add` the held-out items; score the queries of
(a) the added items and (b) the trained items again, each with pure CART and CART + rerank (and rerank
without the untrained items cosine adds, `retrieve.untrained_by_cosine=0`: prefixes only); then the
same after `cart train --continue` (on a copy of the run: the added items' pairs and as many replayed old
ones, CONTINUE's settings). Beside them in the same run: a full retrain on every item (the ceiling) and
BM25 / MiniLM over every item. A query's
right answers are its item and the items whose training text or label equals it (`eval.relevant_kinds`),
named by id, so every run is scored alike. Prints JSON (and writes it to WORK/bench_add.json).

    .venv/bin/python scripts/bench_add.py [--shares 0.1 0.5] [--work checkpoints/bench-add] [--reuse]

--reuse keeps the trained runs a previous run of this script left in WORK (their training times are that
run's, read from its bench_add.json): `cart remove` takes the items it added out again, which leaves the
trained items' identifiers, trie and model as they were, and the rest is done anew.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CART = str(Path(sys.executable).parent / "cart")
# continued training: a few epochs, a short warm-up and half the learning rate, set before any figure was seen
CONTINUE = ["train.epochs=5", "train.validate_from=1", "train.warmup_steps=10", "train.learning_rate=5e-4"]


def main() -> None:
    from cart.config import load_config
    from cart.data import corpus
    from cart.eval.evaluate import held_out_queries
    from cart.retrieve import baselines

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--work", default=str(ROOT / "checkpoints/bench-add"))
    parser.add_argument("--config", default=str(ROOT / "configs/emoji.yaml"))
    parser.add_argument("--reuse", action="store_true", help="keep the trained runs of a previous run in WORK")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = ["--config", args.config, f"output_dir={work}"]
    cfg = load_config(args.config, [f"output_dir={work}", "run=full"])

    previous = json.loads((work / "bench_add.json").read_text(encoding="utf-8")) if args.reuse else None
    # the ceiling: every item trained on
    timings = {"full": previous["seconds"]["full"] if previous else stages(base + ["run=full"])}
    records = corpus.read(work / "full")
    ids = [r["id"] for r in records]
    queries = {name: [(text, ids[row]) for text, row in pairs] for name, pairs in held_out_queries(records).items()
               if name in ("A", "B")}
    relevant = right_answers(records, queries, cfg.eval.relevant_kinds)
    every = {name: [text for text, _ in pairs] for name, pairs in queries.items()}

    scored = {"full retrain": score_run(work / "full", every)}
    for name, method in (("BM25", baselines.BM25(records)), ("MiniLM", baselines.MiniLM(records))):
        scored[name] = {s: [[ids[r] for r in row if r >= 0] for row in method.search(texts, 10)[0]]
                        for s, texts in every.items()}

    report = {"items": len(records), "queries": {s: len(q) for s, q in queries.items()}, "shares": {}}
    for share in args.shares:
        held = held_out_items(records, share, cfg.seed)
        run = f"trained-{round(100 * (1 - share))}"
        manifest(work / f"{run}.jsonl", [r for r in records if r["id"] not in held])
        manifest(work / f"{run}-new.jsonl", [r for r in records if r["id"] in held])
        settings = base + [f"run={run}", "corpus.source=manifest", f"corpus.path={work / f'{run}.jsonl'}"]
        if previous:
            command([CART, "remove", "--run", str(work / run), *sorted(held)])
            timings[run] = {k: v for k, v in previous["seconds"][run].items() if not k.startswith("cart add")
                            and not k.startswith("cart train --")}
        else:
            timings[run] = stages(settings)
        before = score_run(work / run, every)
        start = time.perf_counter()
        command([CART, "add", "--run", str(work / run), "--corpus", str(work / f"{run}-new.jsonl")])
        timings[run]["cart add"] = round(time.perf_counter() - start, 1)
        after = score_run(work / run, every)
        tuned_run = work / f"{run}-continued"
        shutil.rmtree(tuned_run, ignore_errors=True)
        shutil.copytree(work / run, tuned_run, symlinks=True, ignore=shutil.ignore_patterns("state", ".lock"))
        start = time.perf_counter()
        command([CART, "train", "--continue", *settings, f"run={tuned_run.name}", *CONTINUE])
        timings[run]["cart train --continue"] = round(time.perf_counter() - start, 1)
        tuned = score_run(tuned_run, every)
        groups = {"added": lambda item: item in held, "trained": lambda item: item not in held}
        rows = {}
        for group, member in groups.items():
            for method, ranked in [("CART", after["CART"]), ("CART + rerank", after["CART + rerank"]),
                                   ("CART + rerank, prefixes only", after["CART + rerank, prefixes only"]),
                                   ("CART after --continue", tuned["CART"]),
                                   ("CART + rerank after --continue", tuned["CART + rerank"]),
                                   ("CART before add", before["CART"]),
                                   ("CART + rerank before add", before["CART + rerank"]),
                                   ("full retrain: CART", scored["full retrain"]["CART"]),
                                   ("full retrain: CART + rerank", scored["full retrain"]["CART + rerank"]),
                                   ("BM25", scored["BM25"]), ("MiniLM", scored["MiniLM"])]:
                if group == "added" and "before add" in method:
                    continue  # not in the run before
                rows[f"{group}: {method}"] = {
                    s: figures(ranked[s], relevant[s], [member(item) for _, item in queries[s]]) for s in queries}
        report["shares"][share] = {"items_added": len(held), "rows": rows, "seconds": timings[run],
                                   "search_seconds_after_add": after["seconds"],
                                   "continue_settings": CONTINUE}
    report["seconds"] = timings
    report["training_times_from"] = "a previous run (--reuse)" if previous else "this run"
    out = json.dumps(report, indent=2)
    (work / "bench_add.json").write_text(out + "\n", encoding="utf-8")
    print(out)


def stages(overrides: list[str]) -> dict:
    """Run `cart corpus`, `embed`, `ids` and `train` with these arguments; the seconds of each."""
    seconds = {}
    for stage in ("corpus", "embed", "ids", "train"):
        start = time.perf_counter()
        command([CART, stage, *overrides])
        seconds[f"cart {stage}"] = round(time.perf_counter() - start, 1)
    return seconds


def command(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    print(done.stdout.strip().splitlines()[-1], file=sys.stderr)


def held_out_items(records: list[dict], share: float, seed: int) -> set[str]:
    """`share` of the items of each CLDR group (rounded, at least one of a group of two or more), drawn with
    `seed`."""
    rng = np.random.default_rng(seed)
    by_group: dict = {}
    for record in records:
        by_group.setdefault(record["meta"].get("group"), []).append(record["id"])
    held = set()
    for group in sorted(by_group, key=str):
        members = by_group[group]
        count = max(1, round(share * len(members))) if len(members) > 1 else 0
        held.update(rng.choice(members, size=count, replace=False).tolist())
    return held


def manifest(path: Path, records: list[dict]) -> None:
    """A JSONL manifest of the records, as `cart corpus` (source manifest) and `cart add` read it."""
    fields = ("id", "modality", "path", "split", "texts")
    path.write_text("".join(json.dumps({k: r[k] for k in fields}, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


def right_answers(records: list[dict], queries: dict, kinds: list[str]) -> dict[str, list[set[str]]]:
    """Each query's item and the items with a text of `kinds` equal to it (case aside), by id."""
    from cart.data.pairs import items_by_text

    by_text = items_by_text(records, kinds)
    return {s: [{records[r]["id"] for r in by_text.get(text.lower(), ())} | {item} for text, item in pairs]
            for s, pairs in queries.items()}


def score_run(run_dir: Path, texts: dict[str, list[str]]) -> dict:
    """Each query set's top 10 item ids from the run's model, pure and reranked (the run's own settings),
    and reranked without untrained items found by cosine (`retrieve.untrained_by_cosine=0`); the seconds
    each method took over every set."""
    from cart.retrieve.retriever import Retriever

    retriever = Retriever.load(run_dir, rerank=True)
    chosen = retriever.untrained_by_cosine
    out, seconds = {}, {}
    for method, rerank, by_cosine in (("CART", False, chosen), ("CART + rerank", True, chosen),
                                      ("CART + rerank, prefixes only", True, 0)):
        retriever.untrained_by_cosine = by_cosine
        out[method] = {}
        start = time.perf_counter()
        for s, queries in texts.items():
            rows, _ = retriever.search_rows(queries, 10, batch_size=32, rerank=rerank)
            out[method][s] = [[retriever.records[r]["id"] for r in row if r >= 0] for row in rows]
        seconds[method] = round(time.perf_counter() - start, 1)
    return out | {"seconds": seconds}


def figures(ranked: list[list[str]], relevant: list[set[str]], chosen: list[bool]) -> dict:
    """R@1, R@10 and MRR@10 over the chosen queries (`scoring.metrics`, on item ids)."""
    from cart.retrieve import scoring

    rows = [row for row, keep in zip(ranked, chosen) if keep]
    found = scoring.metrics(rows, [right for right, keep in zip(relevant, chosen) if keep])
    return {"queries": len(rows), **{key: found[key] for key in ("R@1", "R@10", "MRR@10")}}

if __name__ == "__main__":
    main()
