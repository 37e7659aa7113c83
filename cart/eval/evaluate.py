"""Stage `cart eval`: R@1/5/10 and MRR@10 of CART and the baselines on every held-out query set.

Reads the trained run (model, identifiers, corpus) and writes:
- `eval.json`: per method and query set, the metrics, latency per query at batch 1 (p50/p95) and
  throughput at `eval.batch_size` (of the main process, over the queries it searched itself);
- `hits.jsonl`: per query, each method's top 10 items with scores and the rank of its first right answer;
- `report.html`: the metrics table and, for sample queries, the retrieved thumbnails marked right or wrong.
Under `accelerate launch` each method's queries are split over the processes and saved in shards
(`eval.partial/`, see `cart/data/shards.py`), so a killed run resumes; the main process scores and writes.

Scoring (the emoji benchmark's rule): a query's right answers are its source item plus every item that has
a text of `eval.relevant_kinds` equal to the query (case-insensitive). The held-out queries are only ever
scored here: nothing is trained, selected or tuned on them.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cart import files
from cart.config import Config, to_dict
from cart.data import pairs, shards
from cart.errors import CartError
from cart.eval import report
from cart.retrieve import baselines
from cart.retrieve.retriever import Retriever
from cart.retrieve.scoring import DEPTH, metrics


def run(cfg: Config) -> Path:
    run_dir, eval_cfg = cfg.run_dir, cfg.eval
    if cfg.retrieve.beam_width < DEPTH:
        raise CartError(f"retrieve.beam_width={cfg.retrieve.beam_width}: eval needs at least {DEPTH} beams for R@10")
    retriever = Retriever.load(run_dir, beam_width=cfg.retrieve.beam_width, device=eval_cfg.device,  # checks every input
                               rerank_candidates=cfg.retrieve.rerank_candidates,
                               untrained_by_cosine=cfg.retrieve.untrained_by_cosine)
    # with generated captions: the baselines see what CART trained on
    records, _ = pairs.with_generated_captions(run_dir, retriever.records)
    query_sets = held_out_queries(records)
    if not query_sets:
        raise CartError(f"{run_dir / files.CORPUS} has no held-out queries (texts of kind `query`): nothing to evaluate")
    relevant = relevant_items(records, query_sets, eval_cfg.relevant_kinds)

    methods = {"CART": lambda queries: retriever.search_rows(queries, DEPTH, eval_cfg.batch_size, rerank=False)}
    if retriever.reranker is not None:  # its own row, never in place of pure CART's
        methods["CART + rerank"] = lambda queries: retriever.search_rows(queries, DEPTH, eval_cfg.batch_size, rerank=True)
    for name in eval_cfg.baselines:
        baseline = _baseline(name, records, cfg)
        if baseline is not None:
            methods[baseline.name] = lambda queries, b=baseline: b.search(queries, DEPTH)

    # under `accelerate launch` the queries are split over the processes; the main one scores and writes
    main_process = shards.processes().is_main_process
    # the items searched: the model's own, or what `cart add` / `cart remove` made of them since
    searched = {name: files.read_manifest(run_dir / name)["sha256"] for name in (files.CORPUS, files.IDS)}
    state = {"model": retriever.manifest["sha256"], "config": to_dict(cfg), **searched}
    results, ranked = {}, {}
    for method, search in methods.items():
        results[method] = {}
        for set_name, queries in query_sets.items():
            texts = [q for q, _ in queries]
            found = _search_in_shards(search, texts, eval_cfg.batch_size, eval_cfg.save_every,
                                      run_dir / files.EVAL_PARTIAL / re.sub(r"\W+", "-", f"{method}-{set_name}"),
                                      state | {"method": method, "set": set_name}, f"eval {method} set {set_name}")
            if found is None:
                continue
            rows, scores, per_second = found
            ranked[method, set_name] = rows, scores
            results[method][set_name] = metrics(rows, relevant[set_name]) | {
                "queries": len(texts), "queries_per_second": per_second}
        if main_process:
            results[method]["latency_ms_batch_1"] = _latency(search, query_sets, eval_cfg.latency_queries, cfg.seed)

    out = run_dir / files.EVAL
    if not main_process:
        return out
    summary = {"methods": results, "relevant_kinds": eval_cfg.relevant_kinds, "beam_width": cfg.retrieve.beam_width,
               "batch_size": eval_cfg.batch_size, "device": str(retriever.device)}
    files.write_text(out, json.dumps(summary, indent=2) + "\n")
    report.write_hits(run_dir / files.HITS, query_sets, relevant, ranked, records)
    report.write_report(run_dir / files.REPORT, summary, query_sets, relevant, ranked, records, cfg)
    model = retriever.manifest  # verified by Retriever.load: no second pass over the files
    files.write_manifest(out, "eval", to_dict(cfg), {**model["inputs"], **searched, files.MODEL_WEIGHTS: model["sha256"]})
    shutil.rmtree(run_dir / files.EVAL_PARTIAL, ignore_errors=True)
    print(report.table(summary))
    print(f"eval: report -> {run_dir / files.REPORT}")
    return out


def held_out_queries(records: list[dict]) -> dict[str, list[tuple[str, int]]]:
    """Query set name -> (query text, source row) for every held-out text, sets in name order."""
    sets: dict[str, list] = {}
    for row, record in enumerate(records):
        for text in record["texts"]:
            if text["kind"] == "query":
                sets.setdefault(text["set"], []).append((text["text"], row))
    return dict(sorted(sets.items()))


def relevant_items(records: list[dict], query_sets: dict, kinds: list[str]) -> dict[str, list[set[int]]]:
    """For every query, its source row plus the rows with a text of one of `kinds` (`caption`, `generated`
    or `query:SET`) equal to it, case-insensitive."""
    by_text = pairs.items_by_text(records, kinds)
    return {name: [by_text.get(q.lower(), set()) | {row} for q, row in queries] for name, queries in query_sets.items()}


def _baseline(name: str, records: list[dict], cfg: Config):
    if name == "bm25":
        return baselines.BM25(records)
    if name == "minilm":
        return baselines.MiniLM(records)
    if name == "dense":
        if cfg.embed.encoder != "imagebind":  # only ImageBind has a text tower beside the item encoder
            return None
        from safetensors.torch import load_file

        from cart import encoders
        from cart.devices import pick_device

        path, _ = files.verified_input(cfg.run_dir, files.EMBEDDINGS)
        encoder = encoders.load(cfg.embed, pick_device(cfg.eval.device))
        return baselines.CrossModal(load_file(str(path))["embeddings"], encoder)
    raise CartError(f"eval.baselines: unknown baseline {name!r} (known: bm25, minilm, dense)")


def _search_in_shards(search, texts: list[str], batch_size: int, save_every: int, folder: Path, state: dict,
                      desc: str) -> tuple[np.ndarray, np.ndarray, float | None] | None:
    """search(batch of texts) -> (rows, scores) for every text, in batches, in resumable shards (split
    over the processes of `accelerate launch`), and the queries a second this process searched (None
    when every shard was read back from a killed run); None on the processes other than the main one."""
    searched = {"queries": 0, "seconds": 0.0}  # what this process searched itself, not shards read back

    def in_batches(start: int, stop: int) -> dict:
        begin = time.perf_counter()
        found = [search(texts[at: min(at + batch_size, stop)]) for at in range(start, stop, batch_size)]
        searched["queries"] += stop - start
        searched["seconds"] += time.perf_counter() - begin
        return {"rows": torch.from_numpy(np.concatenate([r for r, _ in found])),
                "scores": torch.from_numpy(np.concatenate([s for _, s in found]))}

    joined = shards.map_in_shards(len(texts), batch_size * save_every, in_batches, folder, state, desc)
    if joined is None:
        return None
    per_second = round(searched["queries"] / searched["seconds"], 1) if searched["queries"] else None
    return joined["rows"].numpy(), joined["scores"].numpy(), per_second


def _latency(search, query_sets: dict, count: int, seed: int) -> dict:
    """Milliseconds per query at batch 1 over a seeded sample of the held-out queries (after one warm-up)."""
    pool = [q for queries in query_sets.values() for q, _ in queries]
    sample = random.Random(seed).sample(pool, min(count, len(pool)))
    search(sample[:1])
    times = []
    for query in sample:
        start = time.perf_counter()
        search([query])
        times.append(1000 * (time.perf_counter() - start))
    return {"p50": round(float(np.percentile(times, 50)), 2), "p95": round(float(np.percentile(times, 95)), 2),
            "queries": len(times)}
