"""`cart serve` under load (issue 27): concurrent clients on loopback for a bounded time, one query a request,
against `Retriever.search` in this process at batch 1 and batch 32, all in the same run. Prints JSON:
queries/s, p50 / p99 latency, failed requests, how many requests shared a batch.

    .venv/bin/python scripts/bench_serve.py --run checkpoints/emoji [--clients 32] [--seconds 30] [--no-rerank]

The clients stop after --seconds or --max-requests, whichever comes first; the server (its own process,
127.0.0.1 only) is stopped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CART = str(Path(sys.executable).parent / "cart")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=20000)
    parser.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    queries = held_out_texts(Path(args.run), args.seed)
    report = {"run": args.run, "rerank": args.rerank, "clients": args.clients, "offline": offline(args, queries)}
    report["served"] = served(args, queries)
    report["served"]["share_of_batch_32"] = round(report["served"]["queries_per_second"]
                                                  / report["offline"]["batch_32"]["queries_per_second"], 3)
    report["served"]["p99_over_p50"] = round(report["served"]["p99_ms"] / report["served"]["p50_ms"], 2)
    print(json.dumps(report, indent=2))


def held_out_texts(run: Path, seed: int) -> list[str]:
    """The run's held-out query texts (every set), shuffled with `seed`."""
    from cart.data import corpus

    texts = [t["text"] for r in corpus.read(run) for t in r["texts"] if t["kind"] == "query"]
    random.Random(seed).shuffle(texts)
    return texts


def offline(args, queries: list[str]) -> dict:
    """`Retriever.search` in this process: queries/s at batch 1 (64 queries) and batch 32 (512 queries)."""
    from cart.retrieve.retriever import Retriever

    retriever = Retriever.load(args.run, rerank=args.rerank)
    retriever.search(queries[:32], k=10, batch_size=32)  # warm up
    out = {}
    for batch, count in ((1, 64), (32, 512)):
        start = time.perf_counter()
        retriever.search(queries[:count], k=10, batch_size=batch)
        out[f"batch_{batch}"] = {"queries": count, "queries_per_second": round(count / (time.perf_counter() - start), 1)}
    return out


def served(args, queries: list[str]) -> dict:
    """Clients of a `cart serve` process, each sending one query a request over a kept-alive connection."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [CART, "serve", "--run", args.run, "--port", str(port), "--rerank" if args.rerank else "--no-rerank"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(port, server)
        latencies, failures, lock = [], [], threading.Lock()
        budget = iter(range(args.max_requests))
        stop = time.monotonic() + args.seconds

        def client(number: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            rng = random.Random(number)
            while time.monotonic() < stop:
                with lock:
                    if next(budget, None) is None:
                        return
                body = json.dumps({"queries": [rng.choice(queries)], "k": 10})
                start = time.perf_counter()
                try:
                    connection.request("POST", "/search", body, {"Content-Type": "application/json"})
                    answer = connection.getresponse()
                    answer.read()
                    ok = answer.status == 200
                except (OSError, http.client.HTTPException):
                    ok = False
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    (latencies if ok else failures).append(time.perf_counter() - start)

        request("GET", port, "/health")
        for _ in range(4):  # warm up
            request("POST", port, "/search", {"queries": queries[:8], "k": 10})
        info = request("GET", port, "/info")
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        after = request("GET", port, "/info")
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = np.array(latencies) * 1000
    requests = after["requests"] - info["requests"]
    return {"requests": len(latencies), "failed": len(failures), "seconds": round(elapsed, 1),
            "queries_per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "requests_a_batch": round(requests / max(1, after["batches"] - info["batches"]), 1)}


def request(method: str, port: int, path: str, body: dict | None = None) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"})
    answer = connection.getresponse()
    data = json.loads(answer.read())
    if answer.status != 200:
        sys.exit(f"{method} {path}: {answer.status} {data}")
    return data


def wait_for(port: int, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"cart serve exited: {server.stdout.read()}")
        try:
            request("GET", port, "/health")
            return
        except OSError:
            time.sleep(0.3)
    sys.exit(f"cart serve did not answer in {seconds:.0f} s")


if __name__ == "__main__":
    main()
