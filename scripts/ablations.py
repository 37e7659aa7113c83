"""The ablation table on the emoji benchmark: full CART and the paper's Table 4 rows (without fusion, without
R-Drop, `rq` identifiers = without K-Means, `hkmeans` identifiers = without RQ-VAE) plus `atomic` identifiers
and our own lever (without the tag-subset training queries), each trained and evaluated by the real stages on
the same items and held-out queries. Prints JSON and a Markdown table; every variant's logs and run folder
stay under checkpoints/ablation-*/.

Needs the demo's corpus and embeddings (`make demo`, or `cart pipeline --config configs/emoji.yaml`).
The held-out queries are only evaluated: every choice is made on the validation split inside `cart train`.

    .venv/bin/python scripts/ablations.py [--epochs 3] [--seeds 0] [--only "CART,w/o fusion"]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/emoji.yaml"
VARIANTS = {  # name -> config overrides
    "CART": [],
    "w/o fusion": ["model.fusion=false"],
    "w/o R-Drop": ["train.rdrop_weight=0"],
    "rq ids (w/o K-Means)": ["ids.scheme=rq"],
    "hkmeans ids (w/o RQ-VAE)": ["ids.scheme=hkmeans"],
    "atomic ids": ["ids.scheme=atomic"],
    "w/o tag-subset queries": ["train.subset_queries=0"],
}
INPUTS = ("corpus.jsonl", "corpus.manifest.json", "embeddings.safetensors", "embeddings.manifest.json")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def run_stage(stage: str, overrides: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-m", "cart", stage, "--config", str(CONFIG), *overrides],
                              stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed for {overrides}: see {log}")
    return time.perf_counter() - start


def main() -> None:
    from cart.config import load_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs for every variant")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    source = load_config(CONFIG).run_dir
    if not all((source / name).exists() for name in INPUTS):
        raise SystemExit(f"{source}: no corpus and embeddings yet; run `make demo` first")
    chosen = [v for v in VARIANTS if not args.only or v in args.only.split(",")]
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for name in chosen:
            run = f"ablation-{slug(name)}-seed{seed}"
            overrides = [f"run={run}", f"seed={seed}", "eval.baselines=[]", "eval.latency_queries=10", *VARIANTS[name]]
            if args.epochs:
                overrides.append(f"train.epochs={args.epochs}")
            run_dir = load_config(CONFIG, overrides).run_dir
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            for file in INPUTS:
                shutil.copy(source / file, run_dir / file)
            log = run_dir / "ablation.log"
            seconds = {stage: round(run_stage(stage, overrides, log), 1) for stage in ("ids", "train", "eval")}
            metrics = json.loads((run_dir / "eval.json").read_text())["methods"]["CART"]
            trained = json.loads((run_dir / "train.json").read_text())
            ids = json.loads((run_dir / "ids.json").read_text())
            rows.append({"variant": name, "seed": seed, "seconds": seconds, "epochs": trained["epochs"],
                         "best_validation_r1": trained["best_validation_r1"],
                         "train_r1": trained["history"][-1]["train_r1"],
                         "collision_rate": ids["stats"].get("collision_rate"), "identifier_length": len(ids["level_sizes"]),
                         **{f"{s}_{k}": metrics[s][k] for s in ("A", "B") for k in ("R@1", "R@10", "MRR@10")}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=2))
    print("\n| variant | seed | A R@1 | A R@10 | B R@1 | B R@10 | validation R@1 | training-query R@1 | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['seed']} | {r['A_R@1']:.3f} | {r['A_R@10']:.3f} | {r['B_R@1']:.3f} | "
              f"{r['B_R@10']:.3f} | {r['best_validation_r1']:.3f} | {r['train_r1']:.3f} | {r['seconds']['train']:.0f} |")


if __name__ == "__main__":
    main()
