"""`cart serve`: the real server on a free loopback port, talked to over real HTTP (urllib)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cart import files
from cart.retrieve.retriever import Retriever
from tests.conftest import make_media

CART = str(Path(sys.executable).parent / "cart")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body=None, method: str | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a request; `body`: a dict sent as JSON, or bytes as they are."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(reranked, tmp_path_factory):
    """A copy of the shared tiny run (rerank on) served by `cart serve` in its own process: its base URL
    and run folder. Stopped at the end."""
    root = tmp_path_factory.mktemp("serve")
    run = root / "run"
    shutil.copytree(reranked().run_dir, run, symlinks=True, ignore=shutil.ignore_patterns("state", files.LOCK))
    port = free_port()
    # rerank's candidates: every item, so that the test of POST /items does not hang on the tiny model's beams
    process = subprocess.Popen([CART, "serve", "--run", str(run), "--port", str(port), "--rerank-candidates", "16"], cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"cart serve exited: {process.stdout.read()}")
        try:
            if call(url + "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("cart serve did not answer /health in 120 s")
    yield url, run
    process.terminate()
    process.wait(timeout=30)


def test_search_answers_as_the_retriever_does(server):
    url, run = server
    retriever = Retriever.load(run, rerank=True, rerank_candidates=16)
    for rerank in (False, True):
        status, answer = call(url + "/search", {"queries": ["red number 0", "shape 7"], "k": 4, "rerank": rerank})
        assert status == 200
        for result, query in zip(answer["results"], ["red number 0", "shape 7"]):
            rows, scores = retriever.search_rows([query], 4, rerank=rerank)
            assert result["query"] == query
            assert np.allclose([h["score"] for h in result["hits"]], scores[0], atol=1e-4)
            assert result["hits"][0]["id"] == retriever.records[rows[0, 0]]["id"]
            assert set(result["hits"][0]) == {"id", "path", "score", "row"}
    status, info = call(url + "/info")
    assert status == 200 and info["items"] == 12 and info["rerank"] and info["model"] == retriever.manifest["sha256"]


@pytest.mark.parametrize("body, status, message", [
    ({"queries": ["  "]}, 400, "query 1 is empty"),
    ({"queries": []}, 400, "non-empty list"),
    ({"queries": ["red"], "k": 0}, 400, '"k" must be a whole number'),
    ({"queries": ["red"], "k": 1000}, 400, '"k" must be a whole number'),
    ({"queries": ["red"], "rerank": "yes"}, 400, '"rerank" must be true or false'),
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"queries": ["x" * 100] * 12000}).encode(), 413, "at most"),
])
def test_bad_requests_get_a_4xx_and_one_line(server, body, status, message):
    url, _ = server
    got, answer = call(url + "/search", body)
    assert got == status and message in answer["error"] and "\n" not in answer["error"]
    assert call(url + "/health") == (200, {"status": "ok"})


def test_concurrent_clients_share_batches_and_get_their_own_answers(server):
    url, _ = server
    queries = [f"{c} number {i}" for i, c in enumerate(["red", "green", "blue", "yellow"] * 4)]
    alone = {q: call(url + "/search", {"queries": [q], "k": 3})[1]["results"][0]["hits"] for q in queries}
    before = call(url + "/info")[1]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: call(url + "/search", {"queries": [q], "k": 3}), queries * 3))
    after = call(url + "/info")[1]
    for query, (status, answer) in zip(queries * 3, answers):
        assert status == 200 and answer["results"][0]["query"] == query
        assert np.allclose([h["score"] for h in answer["results"][0]["hits"]], [h["score"] for h in alone[query]],
                           atol=1e-4)
    assert after["requests"] - before["requests"] == len(queries) * 3
    assert after["batches"] - before["batches"] < len(queries) * 3  # some requests were decoded together


def test_items_added_over_http_are_found_and_bad_ones_change_nothing(server, tmp_path):
    url, run = server
    make_media(tmp_path)
    rows = [{"id": f"new{i}", "path": str(tmp_path / f"media/img{i}.png"), "texts": [f"violet spiral {i}", "spiral"]}
            for i in range(2)]
    status, answer = call(url + "/items", {"items": rows})
    assert status == 200 and answer["added"] == ["new0", "new1"] and answer["items"] == 14
    info = call(url + "/info")[1]
    assert info["items"] == 14 and info["untrained_items"] == 2
    hits = call(url + "/search", {"queries": ["violet spiral 1"], "k": 3, "rerank": True})[1]["results"][0]["hits"]
    assert "new1" in [h["id"] for h in hits]
    before = {p.name: files.sha256_file(p) for p in run.iterdir() if p.is_file() and p.name != files.LOCK}
    for bad, message in [([rows[0]], "items line 1: duplicate item id 'new0'"),
                         ([{"id": "x", "path": "nowhere.png", "texts": ["a"]}], "missing media file"),
                         ("not a list", '"items" must be a non-empty list')]:
        status, answer = call(url + "/items", {"items": bad})
        assert status == 400 and message in answer["error"] and "\n" not in answer["error"]
    assert {p.name: files.sha256_file(p) for p in run.iterdir() if p.is_file() and p.name != files.LOCK} == before
    assert call(url + "/info")[1]["items"] == 14
