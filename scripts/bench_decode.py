"""Benchmark constrained decoding, printing JSON.

1. On the demo run (`make demo` first; a random model of the same config when it has not trained):
   latency per query of `decoding.decode_texts` (the retriever's beam search, top 10 of 10 beams: our own
   for a level-softmax model) at batch 1 and 32 and the share of decode time spent in the trie, next to
   transformers' `generate` with our `TrieConstraint` (its share too) and with transformers'
   `PrefixConstrainedLogitsProcessor` over a dict trie (GENRE's way), in the same run, on the same queries.
2. Scale: identifiers for 1k, 10k, 100k and 1M synthetic clustered 1024-d items (the ids stage with
   configs/flickr30k.yaml's settings, K at most N / 8, M = 4 at 1M as docs/scale.md advises), a model of the
   emoji architecture (random weights) with each size's identifier vocabulary, latency per query at each
   size next to exact dense retrieval (a float32 N x 1024 matrix product and top 10) on as many queries;
   then batch 1 again with the sizes taking turns (3 rounds of 32 queries), per query and per decoding step.

Queries are training texts of the emoji corpus: timing needs text, not held-out queries.

    .venv/bin/python scripts/bench_decode.py [--sizes 1k,10k,100k,1m] [--skip-scale] [--workdir /tmp/cart-bench-decode]
        [--set ids.levels=4 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


class TimedTrie:
    """A PrefixTrie that adds up the time of what our beam search asks it each step (the constraint)."""

    def __init__(self, trie):
        self.trie, self.seconds = trie, 0.0

    def __getattr__(self, name):
        return getattr(self.trie, name)

    def _timed(self, method, *args):
        start = time.perf_counter()
        out = method(*args)
        self.seconds += time.perf_counter() - start
        return out

    def level_mask(self, *args):
        return self._timed(self.trie.level_mask, *args)

    def child(self, *args):
        return self._timed(self.trie.child, *args)


class TimedConstraint:
    """Wraps a logits processor and adds up the time spent in it."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.seconds += time.perf_counter() - start
        return out


def dict_trie(tokens: np.ndarray) -> dict:
    root: dict = {}
    for row in tokens.tolist():
        node = root
        for token in row:
            node = node.setdefault(token, {})
    return root


def genre_allowed(root: dict, eos: int):
    """GENRE's prefix_allowed_tokens_fn: walk the dict trie along the beam's tokens (start token dropped)."""
    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        node = root
        for token in sent.tolist()[1:]:
            node = node.get(token)
            if node is None:
                return [eos]
        return list(node) or [eos]
    return allowed


def time_decoding(model, tokenizer, ids, genre_root: dict, queries: list[str], batch: int, beams: int,
                  max_tokens: int) -> dict:
    """ms per query of `decoding.decode_texts` (what the retriever runs, top 10 of 10 beams: our beam search
    for a level-softmax model) and of transformers' `generate` with our `TrieConstraint` and with GENRE's
    (over `genre_root`, the identifiers' `dict_trie`); the share of the time each spends in the constraint
    (ours: the trie's `level_mask` and `child`; generate's: the logits processor), and whether the top-1 agree."""
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    from cart.index.vocab import TokenLayout
    from cart.model.decoding import TrieConstraint, decode_texts

    timed_trie = TimedTrie(ids.trie)
    timed = TimedConstraint(TrieConstraint(ids.trie))
    genre = PrefixConstrainedLogitsProcessor(genre_allowed(genre_root, TokenLayout.EOS), beams)
    out: dict = {}
    top1 = {}
    for name, trie, constraint in (("cart", timed_trie, None), ("generate", ids.trie, timed),
                                   ("genre", ids.trie, genre)):
        total, results = 0.0, []
        timed_trie.seconds = timed.seconds = 0.0
        for start in range(0, len(queries), batch):
            begin = time.perf_counter()
            items, _ = decode_texts(model, tokenizer, trie, queries[start: start + batch], beams=beams,
                                    top_k=beams, max_tokens=max_tokens, device=torch.device("cpu"),
                                    constraint=constraint)
            total += time.perf_counter() - begin
            results.append(items[:, 0])
        out[f"{name}_ms_per_query"] = round(1000 * total / len(queries), 2)
        if name != "genre":
            out[f"{name}_constraint_share"] = round((timed_trie if name == "cart" else timed).seconds / total, 4)
        top1[name] = np.concatenate(results)
    out["same_top1"] = round(float(np.mean([(top1["cart"] == top1[name]).mean() for name in ("generate", "genre")])), 4)
    return out


def queries_from(run_dir: Path, count: int, seed: int = 0) -> list[str]:
    from cart.data import corpus, pairs

    texts = [t["text"] for r in corpus.read(run_dir) for t in r["texts"] if t["kind"] in pairs.TRAINING_KINDS]
    return random.Random(seed).sample(texts, count)


def demo_run(args) -> dict:
    from cart.config import load_config
    from cart.index import build_ids
    from cart.model import model_io

    cfg = load_config(ROOT / "configs/emoji.yaml")
    ids = build_ids.load(cfg.run_dir)
    if (cfg.run_dir / "model/model.safetensors").exists():
        model, tokenizer, _ = model_io.load(cfg.run_dir)
        source = "trained"
    else:
        tokenizer = model_io.load_tokenizer(cfg)
        model = model_io.build_model(cfg, ids.layout.level_sizes, len(tokenizer)).eval()
        source = "random weights (the demo has not trained)"
    queries = queries_from(cfg.run_dir, 256)
    beams = cfg.retrieve.beam_width
    result = {"model": source, "items": len(ids.codes), "beams": beams}
    genre_root = dict_trie(ids.tokens)
    for batch, count in ((1, 64), (32, 256)):
        result[f"batch_{batch}"] = time_decoding(model, tokenizer, ids, genre_root, queries[:count], batch, beams,
                                                 cfg.model.max_query_tokens)
        print(f"demo batch {batch}: {result[f'batch_{batch}']}", file=sys.stderr, flush=True)
    return result


def scale(args) -> dict:
    from bench_ids import SIZES, synthetic
    from safetensors.torch import load_file

    from cart import files
    from cart.config import load_config, to_dict
    from cart.index import build_ids
    from cart.model import model_io

    emoji = load_config(ROOT / "configs/emoji.yaml")
    queries = queries_from(emoji.run_dir, 128)
    tokenizer = model_io.load_tokenizer(emoji)
    built = {}
    for name in args.sizes.split(","):
        cfg = load_config(ROOT / "configs/flickr30k.yaml", [f"output_dir={args.workdir}", f"run={name}", *args.set])
        cfg.ids.clusters = min(cfg.ids.clusters, SIZES[name] // 8)  # at least 8 items a cluster (1k: K 125)
        if SIZES[name] >= 1_000_000 and not any(o.startswith("ids.levels=") for o in args.set):
            # docs/scale.md's advice for 1M items (Identifiers: at M = 2 3.3% collide, at 3 0.4% in groups of up to
            # 10, at 4 0.13% in groups of up to 6)
            cfg.ids.levels = 4
        path = cfg.run_dir / files.EMBEDDINGS
        if not files.manifest_path(cfg.run_dir / files.CORPUS).exists():  # embeddings with the corpus files ids checks
            synthetic(path, SIZES[name])
        ids_manifest = files.manifest_path(cfg.run_dir / files.IDS)
        if not ids_manifest.exists() or json.loads(ids_manifest.read_text())["config"]["ids"] != to_dict(cfg)["ids"]:
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON
                build_ids.run(cfg)
            print(f"ids {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        built[name] = build_ids.load(cfg.run_dir)
    results, models = {}, {}
    for name, ids in built.items():
        torch.manual_seed(0)  # the emoji architecture (level softmax on) with this size's identifier vocabulary
        model = models[name] = model_io.build_model(emoji, ids.layout.level_sizes, len(tokenizer)).eval()
        genre_root = dict_trie(ids.tokens)  # once a size: a million dicts take a while
        row = {"items": len(ids.codes), "level_sizes": ids.layout.level_sizes,
               "collision_rate": ids.stats.get("collision_rate")}
        x = load_file(str(Path(args.workdir) / name / files.EMBEDDINGS))["embeddings"]
        q = torch.nn.functional.normalize(torch.randn(len(queries), x.shape[1],
                                                      generator=torch.Generator().manual_seed(0)), dim=1)
        for batch, count in ((1, 32), (32, 128)):
            timing = time_decoding(model, tokenizer, ids, genre_root, queries[:count], batch, emoji.retrieve.beam_width,
                                   emoji.model.max_query_tokens)
            row[f"cart_ms_per_query_batch_{batch}"] = timing["cart_ms_per_query"]
            row[f"constraint_share_batch_{batch}"] = timing["cart_constraint_share"]
            row[f"generate_ms_per_query_batch_{batch}"] = timing["generate_ms_per_query"]
            row[f"generate_constraint_share_batch_{batch}"] = timing["generate_constraint_share"]
            row[f"genre_ms_per_query_batch_{batch}"] = timing["genre_ms_per_query"]
            start = time.perf_counter()
            for i in range(0, count, batch):  # exact dense retrieval: the scores of every item, the top 10
                (q[i: i + batch] @ x.T).topk(10, dim=1)
            row[f"dense_ms_per_query_batch_{batch}"] = round(1000 * (time.perf_counter() - start) / count, 2)
        del x
        row["dense_over_cart_batch_32"] = round(row["dense_ms_per_query_batch_32"]
                                                / row["cart_ms_per_query_batch_32"], 2)
        results[name] = row
        print(f"scale {name}: {row}", file=sys.stderr, flush=True)
    out = {"sizes": results}
    if len(built) > 1:
        out["batch_1_alternated"] = alternated(models, built, tokenizer, queries[:32], emoji)
        print(f"batch 1, sizes alternated: {out['batch_1_alternated']}", file=sys.stderr, flush=True)
    return out


def alternated(models: dict, built: dict, tokenizer, queries: list[str], emoji, rounds: int = 3) -> dict:
    """Batch-1 latency of every size, the sizes taking turns in rounds (one size's run alone swings with
    the machine's load): ms a query and ms a decoding step (a step a level), a list of rounds each."""
    from cart.model.decoding import decode_texts

    out = {name: {"levels": ids.layout.length, "ms_per_query": [], "ms_per_step": []} for name, ids in built.items()}
    for _ in range(rounds):
        for name, ids in built.items():
            start = time.perf_counter()
            for query in queries:
                decode_texts(models[name], tokenizer, ids.trie, [query], beams=emoji.retrieve.beam_width,
                             top_k=emoji.retrieve.beam_width, max_tokens=emoji.model.max_query_tokens,
                             device=torch.device("cpu"))
            ms = 1000 * (time.perf_counter() - start) / len(queries)
            out[name]["ms_per_query"].append(round(ms, 2))
            out[name]["ms_per_step"].append(round(ms / ids.layout.length, 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1k,10k,100k,1m")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--workdir", default="/tmp/cart-bench-decode")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides of the scale part's identifiers (e.g. ids.levels=4)")
    args = parser.parse_args()
    from bench_ids import SIZES

    unknown = set(args.sizes.split(",")) - SIZES.keys()
    if unknown and not args.skip_scale:
        parser.error(f"--sizes: unknown {', '.join(sorted(unknown))} (known: {', '.join(SIZES)})")
    torch.manual_seed(0)
    results = {"threads": torch.get_num_threads(), "demo": demo_run(args)}
    if not args.skip_scale:
        results["scale"] = scale(args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
