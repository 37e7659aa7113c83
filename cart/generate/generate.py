"""Stage `cart generate`: retrieve images for a prompt, then condition an image generator on them.

Two ways to retrieve (`generate.mode`):
- `prompt` (ImageRAG): the top images for the whole prompt, or for each concept description in
  `generate.concepts` (taken in turn, best first, no image twice), up to `generate.images`. With
  `generate.rounds` >= 2, ImageRAG's loop (`imagerag`): the prompt alone first, then what a critic
  (`cart.critics`) finds missing is retrieved for and the image generated again;
- `subqueries` (Cross-modal RAG, Zhu et al.): the prompt's sub-queries (given, written by a local LLM,
  `cart.llm`, or split by `split_prompt`).
  `generate.selection: hybrid`, the paper's: an item's sparse score for sub-query i is 1 when its captions
  (corpus and generated, never its held-out query texts) contain every content word of the sub-query; its
  dense score is the model's log-probability of its identifier for each sub-query (with rerank the cosine
  of the embeddings), their mean scaled to [0, 1] over the candidates. Of the items matching at least one
  sub-query, the Pareto-optimal ones (no other matches every sub-query they match and more; among items
  matching the same sub-queries, the best dense score) are found as the paper's Algorithm 1 finds them, and
  cut to `generate.images` by coverage: each next image the one adding the most sub-queries not covered yet.
  `generative`: each sub-query is decoded by beam search, every item in any sub-query's beams gets one
  score per sub-query (its log-probability there, -inf where that sub-query's beams did not reach it), and
  the chosen set is the Pareto-optimal items (none beaten on every sub-query by another), at most
  `generate.images`, each annotated with the sub-queries whose beams found it. Hybrid falls back to it when
  no caption contains any sub-query.

The generator (`cart.generators`) receives the prompt and the chosen images. Writes, under
`checkpoints/<run>/generations/<name>/`: the generated image(s) and `record.json` (prompt, sub-queries,
how the images were selected, retrieved items with scores, the generator and its settings; for the loop
each round, in `round-<k>/`, and `rounds.png`). `<name>` is `generate.name` or a slug of the
prompt; when that folder exists, `<name>-2`, `<name>-3`, ...: an earlier generation is never overwritten.
The folder appears complete or not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from cart import files
from cart.config import Config
from cart.devices import pick_device
from cart.errors import CartError
from cart.generate import critics, generators, llm
from cart.retrieve.retriever import Retriever
from cart.settings import EmbedConfig

SPLIT = re.compile(r"\s*(?:[,;]|\band\b|\bwith\b)\s*", flags=re.IGNORECASE)
WORD = re.compile(r"[a-z0-9]+")
CAPTION_KINDS = ("caption", "generated")  # an item's held-out query texts never count as its captions
MAX_HYBRID_SUBQUERIES = 8


@dataclass
class Retrieved:
    id: str
    path: str
    row: int
    score: float  # its best score over the queries
    # query -> the retriever's score (log-probability, or with rerank the rerank score); beam search: found
    # there only; hybrid: every sub-query, the dense score (log-probability, or with rerank the cosine)
    scores: dict[str, float] = field(default_factory=dict)
    # the queries (sub-queries, concepts) whose beams found it; hybrid: the sub-queries its captions contain
    covers: list[str] = field(default_factory=list)


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


def content_words(text: str) -> frozenset[str]:
    """The lower-case words of `text` that are not English stop words (scikit-learn's list)."""
    return frozenset(w for w in WORD.findall(text.lower()) if w not in ENGLISH_STOP_WORDS)


def caption_matches(records: list[dict], queries: list[str]) -> np.ndarray:
    """(N, n) bool, Cross-modal RAG's sparse scores: item i's captions contain every content word of query j
    (a query of stop words alone matches nothing)."""
    wanted = [content_words(q) for q in queries]
    matches = np.zeros((len(records), len(queries)), dtype=bool)
    for i, record in enumerate(records):
        words = frozenset().union(*(content_words(t["text"]) for t in record["texts"] if t["kind"] in CAPTION_KINDS))
        matches[i] = [bool(w) and w <= words for w in wanted]
    return matches


def simplex_grid(n: int) -> tuple[np.ndarray, int]:
    """Every weighting of n sub-queries in steps of 1/m with no weight 0: (G, n) integer parts (alpha * m)
    and m. m is as fine as n needs for each Pareto-optimal match pattern to win a weighting alone: a
    pattern of k sub-queries wins where its k weights hold all but n - k steps, evenly, each more than the
    n - k steps elsewhere, so m = max over k of k (n - k + 1) + n - k (5 for 2-3 sub-queries, 11 for 5)."""
    m = grid_steps(n)
    combinations = list(itertools.combinations(range(1, m), n - 1))
    cuts = np.array(combinations, dtype=np.int64).reshape(len(combinations), n - 1)
    edges = np.concatenate([np.zeros((len(cuts), 1), np.int64), cuts, np.full((len(cuts), 1), m)], axis=1)
    return np.diff(edges, axis=1), m


def grid_steps(n: int) -> int:
    """m, the steps of `simplex_grid` for n sub-queries."""
    return max(k * (n - k + 1) + n - k for k in range(1, n + 1))


def beta_bound(n: int) -> float:
    """The dense weight below which the dense term (beta * n * S, S in [0, 1]) never outweighs one step of
    the grid (1 / m): a match pattern another contains and exceeds then never wins a weighting."""
    return 1.0 / (n * grid_steps(n))


def hybrid_pareto(matches: np.ndarray, dense: np.ndarray, beta: float) -> list[int]:
    """Cross-modal RAG's Algorithm 1 over candidates that match at least one sub-query: for each weighting
    alpha of the grid the candidate maximising sum_i alpha_i s_i + beta * n * S, S the `dense` score in
    [0, 1]; the winners in order of first win. `matches` (C, n) bool, `dense` (C,)."""
    # only the best dense score of a match pattern can win (the first of equals, as argmax takes it): the grid
    # then runs over at most 2^n - 1 candidates, however many match
    best: dict[bytes, int] = {}
    for c in range(len(matches)):
        key = matches[c].tobytes()
        if key not in best or dense[c] > dense[best[key]]:
            best[key] = c
    kept = np.array(sorted(best.values()), dtype=np.int64)
    parts, m = simplex_grid(matches.shape[1])
    totals = parts @ matches[kept].T.astype(np.int64) + (beta * matches.shape[1] * m) * dense[kept]  # steps of 1 / m
    return list(dict.fromkeys(kept[totals.argmax(1)].tolist()))


def by_coverage(candidates: list[int], matches: np.ndarray, dense: np.ndarray) -> list[int]:
    """`candidates` reordered so that each next one adds the most sub-queries not covered yet (then the
    best dense score): cutting the list keeps as many sub-queries covered as the cut allows."""
    left, covered, order = list(candidates), np.zeros(matches.shape[1], dtype=bool), []
    while left:
        best = max(left, key=lambda c: (int((matches[c] & ~covered).sum()), dense[c]))
        order.append(best)
        left.remove(best)
        covered |= matches[best]
    return order


def _hybrid(retriever: Retriever, queries: list[str], cap: int, beta: float) -> tuple[list[Retrieved], dict] | None:
    """Cross-modal RAG's hybrid selection (module docstring), or None when no caption contains any sub-query."""
    if len(queries) > MAX_HYBRID_SUBQUERIES:  # the grid grows as C(m - 1, n - 1): 245,157 weightings at 8
        raise CartError(f"generate.selection=hybrid takes at most {MAX_HYBRID_SUBQUERIES} sub-queries, got "
                        f"{len(queries)}: give fewer, or generate.selection=generative")
    matches = caption_matches(retriever.records, queries)
    rows = np.flatnonzero(matches.any(1))
    if not len(rows):
        return None
    bound = beta_bound(len(queries))
    if beta >= bound:
        print(f"generate: pareto_beta {beta} is not below the bound {bound:.4g} for {len(queries)} sub-queries: "
              f"using {0.99 * bound:.4g}")
        beta = 0.99 * bound
    dense = retriever.score_rows(queries, rows)  # (n, C)
    mean = dense.mean(0)
    scaled = (mean - mean.min()) / (mean.max() - mean.min()) if mean.max() > mean.min() else np.zeros_like(mean)
    front = hybrid_pareto(matches[rows], scaled, beta)
    chosen = [Retrieved(retriever.records[rows[c]]["id"], retriever.records[rows[c]]["path"], int(rows[c]),
                        float(dense[:, c].max()), {q: float(dense[j, c]) for j, q in enumerate(queries)},
                        [q for j, q in enumerate(queries) if matches[rows[c], j]])
              for c in by_coverage(front, matches[rows], scaled)[:cap]]
    return chosen, {"selection": "hybrid", "candidates": len(rows), "pareto_optimal": len(front), "beta": beta}


def subqueries_for(prompt: str, cfg: Config) -> tuple[list[str], dict]:
    """The sub-queries (`generate.subqueries`; else written by `generate.subquery_model`; else `split_prompt`)
    and where they came from, for the record. A model whose answers list nothing falls back to the rule."""
    g = cfg.generate
    if g.subqueries:
        return list(g.subqueries), {"subqueries_from": "given"}
    if not g.subquery_model:
        return split_prompt(prompt), {"subqueries_from": "split rule"}
    model = llm.TextModel(g.subquery_model, "generate.subquery_model", g.device, g.max_new_tokens)
    queries, answers = llm.ask_for_list(model, g.subquery_prompt.replace("{prompt}", prompt), MAX_HYBRID_SUBQUERIES,
                                        cfg.seed)
    if queries:
        return queries, {"subqueries_from": model.folder, "answers": answers}
    print(f"generate: {len(answers)} answers of the sub-query model listed nothing: the prompt split by rule instead")
    return split_prompt(prompt), {"subqueries_from": "split rule (the model's answers listed nothing)",
                                  "answers": answers}


def retrieve_for_generation(retriever: Retriever, prompt: str, cfg: Config) -> tuple[list[str], list[Retrieved], dict]:
    """(the queries used, the chosen items, how they were chosen) for `prompt` under `generate.mode`."""
    generate_cfg = cfg.generate
    if generate_cfg.mode == "subqueries":
        queries, written = subqueries_for(prompt, cfg)
    else:
        queries = list(generate_cfg.concepts) or [prompt]
    warn_unread(retriever, queries)
    if generate_cfg.mode == "subqueries" and generate_cfg.selection == "hybrid":
        hybrid = _hybrid(retriever, queries, generate_cfg.images, generate_cfg.pareto_beta)
        if hybrid is not None:
            return queries, hybrid[0], hybrid[1] | written
        print("generate: no caption contains any sub-query: the generative selection instead")
    results = retriever.search(queries, k=retriever.beam_width)
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
        return queries, chosen, {"selection": "generative", "candidates": len(candidates)} | written
    return queries, in_turn([[found[h.row] for h in hits] for hits in results], generate_cfg.images), \
        {"selection": "in turn", "candidates": len(candidates)}


def warn_unread(retriever: Retriever, queries: list[str]) -> None:
    """Warn of each query the model cannot read (emoji only, say): what it retrieves means nothing."""
    for query in queries:
        warning = retriever.warning(query)
        if warning:
            print(f"cart generate: warning: {warning}", file=sys.stderr)


def in_turn(ranked: list[list[Retrieved]], cap: int) -> list[Retrieved]:
    """The queries in turn, each taking its best item not chosen yet (concept 1's, concept 2's, ...), at most
    `cap`. `ranked`: each query's items, best first."""
    left = [iter(items) for items in ranked]
    chosen, taken = [], set()
    while len(chosen) < cap and left:
        for items in list(left):
            item = next((c for c in items if c.row not in taken), None)
            if item is None:  # this query's beam is used up
                left.remove(items)
            elif len(chosen) < cap:
                chosen.append(item)
                taken.add(item.row)
    return chosen


def run(cfg: Config, prompt: str | None = None, run_dir: Path | None = None,
        retriever: Retriever | None = None) -> Path:
    """Retrieve for the prompt (`generate.prompt` unless given), generate, write the image(s) and the record;
    with `generate.rounds` >= 2, ImageRAG's loop (`imagerag`). `retriever`: one already loaded for the run
    (the pipeline's), else it is loaded here."""
    generate_cfg = cfg.generate
    prompt = (prompt if prompt is not None else generate_cfg.prompt).strip()
    if not prompt:
        raise CartError("empty prompt: give the text to generate from")
    run_dir = Path(run_dir or cfg.run_dir)
    generator = generators.load(generate_cfg)  # fail on a bad model folder before decoding anything
    retriever = retriever or Retriever.load(run_dir, beam_width=cfg.retrieve.beam_width, device=generate_cfg.device,
                                            rerank_candidates=cfg.retrieve.rerank_candidates,
                                            untrained_by_cosine=cfg.retrieve.untrained_by_cosine)
    critic = None
    if generate_cfg.rounds > 1:
        embed = EmbedConfig(**retriever.manifest["config"]["embed"]) if generate_cfg.critic == "cosine" else None
        critic = critics.load(generate_cfg, embed, pick_device(generate_cfg.device), cfg.seed)
    else:
        queries, chosen, selection = retrieve_for_generation(retriever, prompt, cfg)
        images = only_images(retriever, chosen, prompt)
    parent, name = run_dir / "generations", generate_cfg.name or _slug(prompt)
    parent.mkdir(parents=True, exist_ok=True)
    files.remove_dead_temporaries(parent)  # what killed generations left
    tmp = parent / f".{name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        if critic is None:
            made = generator.generate(prompt, queries if generate_cfg.mode == "subqueries" else [], images, cfg.seed,
                                      tmp)
            rounds = None
        else:
            made, rounds = imagerag(retriever, generator, critic, prompt, cfg, tmp)
            queries, images = rounds[-1]["queries"], [Retrieved(**r) for r in rounds[-1]["retrieved"]]
            selection = {"selection": f"ImageRAG's loop, {len(rounds)} round(s)"}

        def record(out_dir: Path) -> dict:
            """What the generation in `tmp` is, its files named where they will be: under `out_dir`."""
            def moved(path) -> str:
                return str(out_dir / Path(path).relative_to(tmp))

            written = {"prompt": prompt, "mode": generate_cfg.mode, "queries": queries, "selection": selection,
                       "retrieved": [asdict(c) for c in images],
                       "generator": generate_cfg.generator, "settings": generator.settings(), "seed": cfg.seed,
                       "outputs": [moved(p) for p in made], "run": str(run_dir)}
            if rounds is not None:
                written["rounds"] = [r | {"outputs": [moved(o) for o in r["outputs"]]} for r in rounds]
                written["rounds_board"] = str(out_dir / "rounds.png")
            return written

        out_dir = _publish(tmp, parent, name, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    outputs = [out_dir / path.relative_to(tmp) for path in made]
    print(f"generate: {len(images)} retrieved image(s) -> {generate_cfg.generator}: {', '.join(str(p) for p in outputs)}")
    print(f"generate: record -> {out_dir / 'record.json'}")
    return out_dir


def only_images(retriever: Retriever, chosen: list[Retrieved], query: str) -> list[Retrieved]:
    """The image items of `chosen`; none is an error naming what was found instead."""
    images = [c for c in chosen if retriever.records[c.row]["modality"] == "image"]
    if not images:
        kinds = sorted({retriever.records[c.row]["modality"] for c in chosen})
        raise CartError(f"no images retrieved for {query!r}" + (f" (found only {', '.join(kinds)} items)" if kinds else "")
                        + ": nothing to condition the generator on")
    return images


def imagerag(retriever: Retriever, generator, critic, prompt: str, cfg: Config,
             folder: Path) -> tuple[list[Path], list[dict]]:
    """ImageRAG's loop: round 1 generates from the prompt alone; while rounds are left and the critic finds
    concepts missing from the last image, the next round retrieves for their descriptions (at most
    `concepts_per_round`, taking turns, `images` in all; for the prompt itself when the critic cannot tell)
    and generates with those images. Every image gets the critic's verdict; `rounds.png` shows it all, a
    row a round. -> (the last round's outputs, each round's record: queries, retrieved items, outputs, the
    critic's verdict on them)."""
    g = cfg.generate
    concepts = list(g.concepts) or split_prompt(prompt)
    rounds: list[dict] = []
    queries: list[str] = []
    images: list[Retrieved] = []
    while True:
        made = generator.generate(prompt, queries, images, cfg.seed, folder / f"round-{len(rounds) + 1}")
        verdict = critic(made[0], prompt, concepts)
        rounds.append({"round": len(rounds) + 1, "queries": queries, "retrieved": [asdict(c) for c in images],
                       "outputs": [str(p) for p in made],
                       "critic": verdict.said | {"missing": [list(m) for m in verdict.missing or []],
                                                 "cannot_tell": verdict.missing is None}})
        if verdict.missing == [] or len(rounds) == g.rounds:
            generators.rounds_board(prompt, rounds, folder / "rounds.png", g.thumbnail)
            return made, rounds
        queries = ([description for _, description in verdict.missing][: g.concepts_per_round]
                   if verdict.missing is not None else [prompt])
        warn_unread(retriever, queries)
        hits = retriever.search(queries, k=retriever.beam_width)
        ranked = [[Retrieved(h.id, h.path, h.row, h.score, {q: h.score}, [q]) for h in found
                   if retriever.records[h.row]["modality"] == "image"] for q, found in zip(queries, hits)]
        images = in_turn(ranked, g.images)
        if not images:  # nothing to generate with: the last image stands, and the record says why
            rounds[-1]["stopped"] = f"no images retrieved for {', '.join(queries)}"
            print(f"generate: {rounds[-1]['stopped']}: the loop ends at round {len(rounds)}")
            generators.rounds_board(prompt, rounds, folder / "rounds.png", g.thumbnail)
            return made, rounds


def _publish(tmp: Path, parent: Path, name: str, record) -> Path:
    """Rename the finished generation `tmp` to `name` under `parent`, or `name-2`, `name-3`, ... when that is
    taken (an empty folder, which a killed older cart left, is not), with `record(folder)` as its
    record.json: the folder appears whole or not at all, and never replaces an earlier generation."""
    for n in itertools.count(1):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            continue
        files.write_text(tmp / "record.json", json.dumps(record(folder), indent=2, ensure_ascii=False) + "\n")
        try:
            os.rename(tmp, folder)  # refused when another generation took the name meanwhile
            return folder
        except OSError:
            continue


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"
