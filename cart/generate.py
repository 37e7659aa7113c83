"""Stage `cart generate`: retrieve images for a prompt, then condition an image generator on them.

Two ways to retrieve (`generate.mode`):
- `prompt` (ImageRAG): the top images for the whole prompt, or for each concept description in
  `generate.concepts` (taken in turn, best first, no image twice), up to `generate.images`;
- `subqueries` (Cross-modal RAG, Zhu et al.): the prompt's sub-queries (given, or split by `split_prompt`)
  are each decoded by beam search; every item in any sub-query's beams gets one score per sub-query (its
  identifier's log-probability there, -inf where that sub-query's beams did not reach it), and the chosen
  set is the Pareto-optimal items (none beaten on every sub-query by another), at most `generate.images`,
  each annotated with the sub-queries whose beams found it.

The generator (`cart.generators`) receives the prompt and the chosen images. Writes, under
`checkpoints/<run>/generations/<name>/`: the generated image(s) and `record.json` (prompt, sub-queries,
retrieved items with scores, the generator and its settings). `<name>` is `generate.name` or a slug of the
prompt; when that folder exists, `<name>-2`, `<name>-3`, ...: an earlier generation is never overwritten.
The folder appears complete or not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cart import files, generators
from cart.config import Config
from cart.errors import CartError
from cart.retriever import Retriever

SPLIT = re.compile(r"\s*(?:[,;]|\band\b|\bwith\b)\s*", flags=re.IGNORECASE)


@dataclass
class Retrieved:
    id: str
    path: str
    row: int
    score: float  # best log-probability over the queries that found it
    scores: dict[str, float] = field(default_factory=dict)  # query -> log-probability (found there only)
    covers: list[str] = field(default_factory=list)  # the queries (sub-queries, concepts) whose beams found it


def split_prompt(prompt: str) -> list[str]:
    """The documented rule: split on commas, semicolons and the words "and" and "with"; drop empty parts.
    A prompt with none of them is one sub-query."""
    parts = [p.strip() for p in SPLIT.split(prompt) if p and p.strip()]
    return parts or [prompt.strip()]


def pareto_front(scores: np.ndarray) -> np.ndarray:
    """Indices of the rows of `scores` (candidates x sub-queries, higher is better, -inf allowed) that no
    other row dominates (>= on every sub-query, > on at least one)."""
    at_least = (scores[:, None, :] >= scores[None, :, :]).all(2)  # [b, a]: b >= a everywhere
    better = (scores[:, None, :] > scores[None, :, :]).any(2)
    dominated = (at_least & better).any(0)
    return np.flatnonzero(~dominated)


def choose_pareto(scores: np.ndarray, cap: int) -> list[int]:
    """The Pareto front, cut to `cap`: the sub-queries take turns choosing their best remaining front member
    (among those their beams found), so every sub-query is covered before any gets a second image."""
    front = list(pareto_front(scores))
    chosen: list[int] = []
    while front and len(chosen) < cap:
        before = len(chosen)
        for j in range(scores.shape[1]):
            reached = [i for i in front if np.isfinite(scores[i, j])]
            if reached and len(chosen) < cap:
                best = max(reached, key=lambda i: scores[i, j])
                chosen.append(best)
                front.remove(best)
        if len(chosen) == before:  # what is left was found by no sub-query
            break
    return chosen


def retrieve_for_generation(retriever: Retriever, prompt: str, cfg: Config) -> tuple[list[str], list[Retrieved]]:
    """(the queries used, the chosen items) for `prompt` under `generate.mode`."""
    generate_cfg = cfg.generate
    if generate_cfg.mode == "subqueries":
        queries = list(generate_cfg.subqueries) or split_prompt(prompt)
    else:
        queries = list(generate_cfg.concepts) or [prompt]
    k = retriever.beam_width
    results = retriever.search(queries, k=k)
    found: dict[int, Retrieved] = {}
    for query, hits in zip(queries, results):
        for hit in hits:
            item = found.setdefault(hit.row, Retrieved(hit.id, hit.path, hit.row, hit.score))
            item.scores[query] = hit.score
            item.covers.append(query)
            item.score = max(item.score, hit.score)
    candidates = list(found.values())
    if generate_cfg.mode == "subqueries":
        matrix = np.array([[c.scores.get(q, -np.inf) for q in queries] for c in candidates]).reshape(len(candidates), len(queries))
        chosen = [candidates[i] for i in choose_pareto(matrix, generate_cfg.images)]
    else:  # the queries in turn, each taking its best item not chosen yet: concept 1's, concept 2's, ...
        ranked = [iter([found[h.row] for h in hits]) for hits in results]
        chosen, taken = [], set()
        while len(chosen) < generate_cfg.images and ranked:
            for hits in list(ranked):
                item = next((c for c in hits if c.row not in taken), None)
                if item is None:  # this query's beam is used up
                    ranked.remove(hits)
                elif len(chosen) < generate_cfg.images:
                    chosen.append(item)
                    taken.add(item.row)
    return queries, chosen


def run(cfg: Config, prompt: str | None = None, run_dir: Path | None = None,
        retriever: Retriever | None = None) -> Path:
    """Retrieve for the prompt (`generate.prompt` unless given), generate, write the image(s) and the record.
    `retriever`: one already loaded for the run (the pipeline's), else it is loaded here."""
    generate_cfg = cfg.generate
    prompt = (prompt if prompt is not None else generate_cfg.prompt).strip()
    if not prompt:
        raise CartError("empty prompt: give the text to generate from")
    run_dir = Path(run_dir or cfg.run_dir)
    generator = generators.load(generate_cfg)  # fail on a bad model folder before decoding anything
    retriever = retriever or Retriever.load(run_dir, beam_width=cfg.retrieve.beam_width, device=generate_cfg.device)
    queries, chosen = retrieve_for_generation(retriever, prompt, cfg)
    images = [c for c in chosen if retriever.records[c.row]["modality"] == "image"]
    if not images:
        kinds = sorted({retriever.records[c.row]["modality"] for c in chosen})
        raise CartError(f"no images retrieved for {prompt!r}" + (f" (found only {', '.join(kinds)} items)" if kinds else "")
                        + ": nothing to condition the generator on")
    out_dir = _new_folder(run_dir / "generations", generate_cfg.name or _slug(prompt))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        made = generator.generate(prompt, queries if generate_cfg.mode == "subqueries" else [], images, cfg.seed, tmp)
        outputs = [out_dir / path.name for path in made]
        record = {"prompt": prompt, "mode": generate_cfg.mode, "queries": queries, "retrieved": [asdict(c) for c in images],
                  "generator": generate_cfg.generator, "settings": generator.settings(), "seed": cfg.seed,
                  "outputs": [str(p) for p in outputs], "run": str(run_dir)}
        files.write_text(tmp / "record.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir)  # over the empty folder reserved for it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        out_dir.rmdir()
        raise
    print(f"generate: {len(images)} retrieved image(s) -> {generate_cfg.generator}: {', '.join(str(p) for p in outputs)}")
    print(f"generate: record -> {out_dir / 'record.json'}")
    return out_dir


def _new_folder(parent: Path, name: str) -> Path:
    """Reserve a new empty folder `name` under `parent`, or `name-2`, `name-3`, ... when it is taken."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"
