"""Benchmark `cart ids`: wall time and peak memory per phase, and the identifier statistics (collision rate
before the counter, largest group, reconstruction error), as JSON, every scheme side by side.

Cases: the emoji embeddings of the demo run (if `make demo` has run; configs/emoji.yaml), and
synthetic clustered float32 embeddings of 10k, 100k and 1M x 1024 (configs/flickr30k.yaml's ids).
`--set` overrides the config of every case (e.g. `--set ids.clusters=1024 ids.codebook_size=1024`).
Each case and scheme runs the real stage (`build_ids.run`) in a fresh process, so its peak memory is its
own. Goals: 1M x 1024 in under 10 minutes with peak memory under 8 GB on 2 cores; collisions before the
counter at most 5% and a largest group of at most 8 with at most 6 tokens.

    .venv/bin/python scripts/bench_ids.py [--cases emoji,100k,1m] [--schemes cart,rqkmeans] [--set key=value ...]
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
# The synthetic cases take their identifier settings from the Flickr30K config (K 1,024, M 2, V 1,024).
SIZES = {"1k": 1_000, "10k": 10_000, "100k": 100_000, "1m": 1_000_000}  # the synthetic cases
CONFIGS = {"emoji": "configs/emoji.yaml"} | {case: "configs/flickr30k.yaml" for case in SIZES}


def synthetic(path: Path, n: int, dim: int = 1024, table: int = 1000, seed: int = 0) -> None:
    """Unit vectors clustered at three scales, c1[a] + c2[b] / 2 + c3[c] / 4 + noise / 10 with random
    tables c1, c2, c3 of `table` directions each: coarse clusters that hold finer structure, like real
    embeddings (isotropic noise around a few centres would leave the fine codes nothing to find)."""
    import torch
    from safetensors.torch import save_file

    from cart import files

    g = torch.Generator().manual_seed(seed)
    tables = [torch.randn(table, dim, generator=g) * scale for scale in (1.0, 0.5, 0.25)]
    x = torch.empty(n, dim)
    for i in range(0, n, 65536):
        rows = min(65536, n - i)
        chunk = 0.1 * torch.randn(rows, dim, generator=g)
        for t in tables:
            chunk += t[torch.randint(table, (rows,), generator=g)]
        x[i: i + rows] = torch.nn.functional.normalize(chunk, dim=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    corpus = path.parent / files.CORPUS  # `cart ids` checks the embeddings were made from the run's corpus
    files.write_text(corpus, "".join(json.dumps({"id": f"synthetic{i}", "modality": "image", "path": "",
                                                 "texts": []}) + "\n" for i in range(n)))
    files.write_manifest(corpus, "corpus", {"synthetic": {"n": n}}, {})
    save_file({"embeddings": x}, str(path))
    files.write_manifest(path, "embed", {"synthetic": {"n": n, "dim": dim, "table": table}},
                         {files.CORPUS: files.sha256_file(corpus)})


def child(output_dir: str, case: str, scheme: str, overrides: str) -> None:
    """Run the stage in this process and print its figures."""
    from cart import files, measure
    from cart.config import load_config
    from cart.index import build_ids

    cfg = load_config(ROOT / CONFIGS[case], [f"output_dir={output_dir}", f"run={case}", f"ids.scheme={scheme}",
                                             *json.loads(overrides)])
    start = time.perf_counter()
    build_ids.run(cfg, force=True)  # built again each time: it is what is timed
    seconds = time.perf_counter() - start
    summary = json.loads((cfg.run_dir / files.IDS_STATS).read_text())
    # each phase resets the peak; the whole run's peak is the largest of theirs and what came after
    peak = max([p["peak_rss_gb"] for p in summary["phases"].values()] + [measure.peak_rss_gb()])
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_gb": round(peak, 3), **summary}))


HEADLINE = ("seconds", "peak_rss_gb", "collision_rate", "largest_group", "relative_reconstruction_error", "error")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="emoji,100k,1m")
    parser.add_argument("--schemes", default="cart,rqkmeans")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every case")
    parser.add_argument("--workdir", default="/tmp/cart-bench-ids")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    work = Path(args.workdir)
    results: dict = {"overrides": args.set}
    for case in args.cases.split(","):
        run_dir = work / case
        if case == "emoji":
            source = ROOT / "checkpoints/emoji"
            if not (source / "embeddings.safetensors").exists():
                results[case] = {"skipped": "run `make demo` first"}
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in ("embeddings.safetensors", "embeddings.manifest.json", "corpus.jsonl", "corpus.manifest.json"):
                shutil.copy(source / name, run_dir / name)
        elif not (run_dir / "corpus.manifest.json").exists():
            synthetic(run_dir / "embeddings.safetensors", SIZES[case])
        results[case] = {}
        for scheme in args.schemes.split(","):
            done = subprocess.run([sys.executable, __file__, "--child", str(work), case, scheme, json.dumps(args.set)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                figures = {"error": done.stderr.strip().splitlines()[-1:]}
            else:
                summary = json.loads(done.stdout.strip().splitlines()[-1])
                figures = {k: summary[k] for k in ("seconds", "peak_rss_gb", "level_sizes")} | summary["stats"] | {
                    "phases": summary["phases"]}
            results[case][scheme] = figures
            print(f"{case} {scheme}: {json.dumps({k: figures.get(k) for k in HEADLINE})}", file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
