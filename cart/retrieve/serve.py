"""`cart serve`: a trained run answering queries over HTTP (FastAPI on uvicorn).

    cart serve --run checkpoints/emoji [--host 127.0.0.1] [--port 8000]

- `POST /search` `{"queries": ["red heart"], "k": 10, "rerank": true}` -> `{"results": [{"query": ...,
  "hits": [{"id", "path", "score", "row"}, ...]}]}`: what `Retriever.search` returns (k and rerank
  default to the run's);
- `POST /items` `{"items": [{"id", "path", "texts", ...}]}` (rows of a `cart corpus` manifest; relative
  paths are read under the server's working folder) adds them as `cart add` does; the server answers
  searches meanwhile and over the new items once they are in;
- `GET /health`; `GET /info`: the model, the item count, the identifiers' version.

Requests that arrive together are decoded together: one thread decodes every query waiting (up to
`retrieve.batch_size`, after `--wait-ms` for more to arrive), then answers each request from the batch,
so a loaded server decodes at batch throughput, not one query at a time. A bad request gets a 4xx
status and `{"error": "<one line>"}`; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cart import files
from cart.errors import CartError
from cart.index import update
from cart.retrieve.retriever import Hit, Retriever

MAX_BODY = 1 << 20  # bytes of a request body: a search is a few queries, an addition a few thousand rows
MAX_DRAIN = 64 << 20  # bytes of an oversized body read before its 413 (beyond: answered at once)
MAX_QUERIES = 1024  # queries a request


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Pending:
    queries: list[str]
    k: int
    rerank: bool
    done: Future = field(default_factory=Future)


class Batcher:
    """One decoding thread over a queue of search requests: it takes the first waiting request, then every
    other one that arrives within `wait` seconds (up to `batch_size` queries), decodes each rerank mode's
    queries as one batch, and answers every request."""

    def __init__(self, retriever: Retriever, batch_size: int, wait: float):
        self.retriever, self.batch_size, self.wait = retriever, batch_size, wait
        self.batches = self.requests = 0  # decoded so far: a loaded server's requests share batches
        self.waiting: queue.Queue[Pending | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="cart-decode", daemon=True)
        self.thread.start()

    def submit(self, queries: list[str], k: int, rerank: bool) -> Future:
        pending = Pending(queries, k, rerank)
        self.waiting.put(pending)
        return pending.done

    def close(self) -> None:
        self.waiting.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch, size = [first], len(first.queries)
            deadline = time.monotonic() + self.wait
            while size < self.batch_size:
                try:
                    pending = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if pending is None:
                    self.waiting.put(None)  # stop after this batch
                    break
                batch.append(pending)
                size += len(pending.queries)
            self.batches, self.requests = self.batches + 1, self.requests + len(batch)
            retriever = self.retriever  # one version of the items for the whole batch (POST /items swaps it)
            for rerank in (False, True):
                group = [p for p in batch if p.rerank == rerank]
                if group:
                    self._decode(retriever, group, rerank)

    def _decode(self, retriever: Retriever, group: list[Pending], rerank: bool) -> None:
        queries = [q for p in group for q in p.queries]
        try:
            rows, scores = retriever.search_rows(queries, max(p.k for p in group), batch_size=len(queries), rerank=rerank)
        except Exception as e:  # noqa: BLE001 - answered to each request: the thread serves on
            for p in group:
                p.done.set_exception(e)
            return
        at = 0
        for p in group:
            p.done.set_result([[Hit(retriever.records[r]["id"], retriever.records[r]["path"], float(s), int(r))
                                for r, s in zip(row[: p.k], score[: p.k]) if r >= 0]
                               for row, score in zip(rows[at: at + len(p.queries)], scores[at: at + len(p.queries)])])
            at += len(p.queries)


def create_app(retriever: Retriever, batch_size: int | None = None, wait_ms: float = 2.0):
    """The FastAPI application serving `retriever` (its run folder is where POST /items adds)."""
    batcher = Batcher(retriever, batch_size or retriever.batch_size, wait_ms / 1000)
    adding = threading.Lock()  # one POST /items at a time

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="cart", description=__doc__.splitlines()[0], lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception):  # a bug, not the client's: still one line, and serving on
        return JSONResponse({"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"},
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        current = batcher.retriever
        return {"run": str(current.run_dir), "model": current.manifest.get("sha256"), "items": len(current.records),
                "ids_version": files.read_manifest(current.run_dir / files.IDS)["sha256"],
                "rerank": current.reranker is not None, "beam_width": current.beam_width,
                "rerank_candidates": current.rerank_candidates, "top_k": current.top_k,
                "untrained_items": len(current.untrained_rows), "untrained_by_cosine": current.untrained_by_cosine,
                "batch_size": batcher.batch_size, "batches": batcher.batches, "requests": batcher.requests}

    @app.post("/search")
    async def search(request: Request):
        body = await _json_body(request)
        current = batcher.retriever
        queries = body.get("queries")
        if isinstance(queries, str):
            queries = [queries]
        if not isinstance(queries, list) or not queries:
            raise BadRequest(400, '"queries" must be a non-empty list of texts')
        if len(queries) > MAX_QUERIES:
            raise BadRequest(413, f"{len(queries)} queries in one request; at most {MAX_QUERIES}")
        for i, query in enumerate(queries):
            if not isinstance(query, str) or not query.strip():
                raise BadRequest(400, f"query {i + 1} is empty or not a text")
        rerank = body.get("rerank", current.reranker is not None)
        if not isinstance(rerank, bool):
            raise BadRequest(400, f'"rerank" must be true or false, got {rerank!r}')
        if rerank and current.reranker is None:
            raise BadRequest(400, "this server was started without rerank (cart serve --rerank)")
        beams = current.rerank_candidates if rerank else current.beam_width
        k = body.get("k", min(current.top_k, beams))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= beams:
            raise BadRequest(400, f'"k" must be a whole number from 1 to {beams} (the beam width), got {k!r}')
        hits = await asyncio.wrap_future(batcher.submit(queries, k, rerank))
        return {"results": [{"query": q, "hits": [vars(h) for h in found]} for q, found in zip(queries, hits)]}

    @app.post("/items")
    async def items(request: Request):
        body = await _json_body(request)
        rows = body.get("items")
        if not isinstance(rows, list) or not rows:
            raise BadRequest(400, '"items" must be a non-empty list of items ({"id", "path", "texts", ...})')
        if not adding.acquire(blocking=False):
            raise BadRequest(409, "another POST /items is adding items: send these when it has answered")
        try:
            change = await asyncio.to_thread(_add, batcher, rows)
        finally:
            adding.release()
        return {"added": change.ids, "items": change.items_after, "seconds": round(change.seconds, 3)}

    return app


async def _json_body(request: Request) -> dict:
    """The request's body as a JSON object, refusing one over MAX_BODY bytes or not JSON. An oversized body
    is still read (up to MAX_DRAIN bytes, kept no further than MAX_BODY) so that the client, still sending,
    gets the 413 rather than a connection closed under it."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_DRAIN:
        raise BadRequest(413, f"the body is {declared} bytes; at most {MAX_BODY}")
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY:
            body += chunk
        elif size > MAX_DRAIN:
            break
    if size > MAX_BODY:
        raise BadRequest(413, f"the body is over {MAX_BODY} bytes; at most {MAX_BODY}")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


def _add(batcher: Batcher, rows: list) -> update.Change:
    """`cart add` of the rows (a manifest written to a temporary file), then the new items swapped in."""
    run_dir = batcher.retriever.run_dir
    with tempfile.TemporaryDirectory(prefix="cart-serve-") as folder:
        manifest = Path(folder) / "items.jsonl"
        manifest.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        try:
            with files.run_lock(run_dir, f"cart serve (POST /items, PID {os.getpid()})"):
                change = update.add(run_dir, ["corpus.source=manifest", f"corpus.path={manifest}",
                                              f"corpus.media_root={os.getcwd()}"])
        except CartError as e:
            message = str(e).replace(str(manifest), "items")  # "items line 2: ..." names the row
            raise BadRequest(409 if "is being written by" in message else 400, message) from None
    batcher.retriever = batcher.retriever.reloaded()
    return change


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, rerank: bool | None = None,
          rerank_candidates: int | None = None, batch_size: int | None = None, wait_ms: float = 2.0) -> None:
    """Load the run and serve it until interrupted."""
    import uvicorn

    retriever = Retriever.load(run_dir, rerank=rerank, rerank_candidates=rerank_candidates)
    app = create_app(retriever, batch_size, wait_ms)
    print(f"serve: {run_dir} ({len(retriever.records)} items, rerank {'on' if retriever.reranker else 'off'}) "
          f"on http://{host}:{port}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"serve: warning: listening on {host}, not only this machine: anyone who reaches it can add items",
              flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
