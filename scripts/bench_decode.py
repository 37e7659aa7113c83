"""Benchmark constrained decoding, printing JSON.

1. On the demo run (`make demo` first; a random model of the same config when it has not trained):
   latency per query at batch 1 and 32 with our trie constraint (one tensor mask per step), the share
   of decode time spent inside the constraint, and the same model driven by transformers'
   `prefix_allowed_tokens_fn` over a dict trie (GENRE's way), in the same run, on the same queries.
2. Scale: identifiers for 1k, 10k, 100k and 1M synthetic clustered 1024-d items (the ids stage with
   configs/flickr30k.yaml's settings, K at most N / 8), one model (the emoji architecture, random weights, its output
   vocabulary sized for the largest identifier set), latency per query at each size next to exact dense
   retrieval (a float32 N x 1024 matrix product and top 10).

Queries are training texts of the emoji corpus: timing needs text, not held-out queries.

    .venv/bin/python scripts/bench_decode.py [--sizes 1k,10k,100k,1m] [--skip-scale] [--workdir /tmp/cart-bench-decode]
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
from transformers import LogitsProcessorList

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"1k": 1_000, "10k": 10_000, "100k": 100_000, "1m": 1_000_000}


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


def generate(model, encoded, trie, beams: int, **constraint):
    return model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], num_beams=beams,
                          num_return_sequences=1, max_new_tokens=trie.length + 1, length_penalty=0.0,
                          early_stopping=True, do_sample=False, **constraint)


def time_decoding(model, tokenizer, ids, queries: list[str], batch: int, beams: int, max_tokens: int) -> dict:
    """ms per query for our constraint and for GENRE's, the constraint's share, and whether they agree."""
    from cart.decoding import TrieConstraint
    from cart.vocab import TokenLayout

    trie = ids.trie
    timed = TimedConstraint(TrieConstraint(trie))
    genre = genre_allowed(dict_trie(ids.tokens), TokenLayout.EOS)
    out: dict = {}
    sequences = {}
    for name, constraint in (("cart", {"logits_processor": LogitsProcessorList([timed])}),
                             ("genre", {"prefix_allowed_tokens_fn": genre})):
        total, results = 0.0, []
        timed.seconds = 0.0
        for start in range(0, len(queries), batch):
            encoded = tokenizer(queries[start: start + batch], padding=True, truncation=True, max_length=max_tokens,
                                return_tensors="pt")
            begin = time.perf_counter()
            with torch.no_grad():
                results.append(generate(model, encoded, trie, beams, **constraint)[:, 1: trie.length + 1])
            total += time.perf_counter() - begin
        out[f"{name}_ms_per_query"] = round(1000 * total / len(queries), 2)
        if name == "cart":
            out["constraint_share"] = round(timed.seconds / total, 4)
        sequences[name] = torch.cat([r.reshape(-1, trie.length) for r in results])
    out["same_top1"] = round(float((sequences["cart"] == sequences["genre"]).all(1).float().mean()), 4)
    return out


def queries_from(run_dir: Path, count: int, seed: int = 0) -> list[str]:
    from cart import corpus, data

    texts = [t["text"] for r in corpus.read(run_dir) for t in r["texts"] if t["kind"] in data.TRAINING_KINDS]
    return random.Random(seed).sample(texts, count)


def demo_run(args) -> dict:
    from cart import build_ids, model_io
    from cart.config import load_config

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
    for batch, count in ((1, 64), (32, 256)):
        result[f"batch_{batch}"] = time_decoding(model, tokenizer, ids, queries[:count], batch, beams,
                                                 cfg.model.max_query_tokens)
        print(f"demo batch {batch}: {result[f'batch_{batch}']}", file=sys.stderr, flush=True)
    return result


def scale(args) -> dict:
    from bench_ids import synthetic
    from safetensors.torch import load_file

    from cart import build_ids, files, model_io
    from cart.config import load_config, to_dict

    emoji = load_config(ROOT / "configs/emoji.yaml")
    queries = queries_from(emoji.run_dir, 64)
    tokenizer = model_io.load_tokenizer(emoji)
    built = {}
    for name in args.sizes.split(","):
        cfg = load_config(ROOT / "configs/flickr30k.yaml", [f"output_dir={args.workdir}", f"run={name}"])
        cfg.ids.clusters = min(cfg.ids.clusters, SIZES[name] // 8)  # at least 8 items a cluster (1k: K 125)
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
    widest = max(built.values(), key=lambda ids: ids.layout.vocab_size).layout.level_sizes
    emoji.model.level_softmax = False  # one model for every size: its levels are the widest identifiers'
    torch.manual_seed(0)
    model = model_io.build_model(emoji, widest, len(tokenizer)).eval()
    results = {}
    for name, ids in built.items():
        row = {"items": len(ids.codes), "identifier_length": ids.layout.length, "collision_rate":
               ids.stats.get("collision_rate")}
        for batch in (1, 32):
            count = 32 if batch == 1 else 64
            timing = time_decoding(model, tokenizer, ids, queries[:count], batch, emoji.retrieve.beam_width,
                                   emoji.model.max_query_tokens)
            row[f"cart_ms_per_query_batch_{batch}"] = timing["cart_ms_per_query"]
            row[f"constraint_share_batch_{batch}"] = timing["constraint_share"]
        x = load_file(str(Path(args.workdir) / name / files.EMBEDDINGS))["embeddings"]
        q = torch.nn.functional.normalize(torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(0)), dim=1)
        for batch in (1, 32):
            count = 16 if batch == 1 else 64
            start = time.perf_counter()
            for i in range(0, count, batch):
                (q[i: i + batch] @ x.T).topk(10, dim=1)
            row[f"dense_ms_per_query_batch_{batch}"] = round(1000 * (time.perf_counter() - start) / count, 2)
        del x
        results[name] = row
        print(f"scale {name}: {row}", file=sys.stderr, flush=True)
    return {"model_level_sizes": widest, "sizes": results}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1k,10k,100k,1m")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--workdir", default="/tmp/cart-bench-decode")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"threads": torch.get_num_threads(), "demo": demo_run(args)}
    if not args.skip_scale:
        results["scale"] = scale(args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
