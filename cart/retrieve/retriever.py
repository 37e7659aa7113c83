"""The inference API: load a trained run once, answer many queries.

    from cart.retrieve.retriever import Retriever
    retriever = Retriever.load("checkpoints/emoji")
    for hit in retriever.search(["a red heart"], k=5)[0]:
        print(hit.id, hit.path, hit.score)

A query is encoded, decoded by beam search constrained to the run's identifiers, and every finished
identifier mapped back to its corpus item: the retriever can only ever return real items. With rerank
(`retrieve.rerank`, `Retriever.load(run, rerank=True)`), the candidates of a beam search with
`retrieve.rerank_candidates` beams are re-ordered by `cart.rerank`: cosine of the query's and the item's
embeddings + the weight `cart train` chose times the log-probability. Items `cart add` added that the
model was not trained on join the candidates beside the trained sibling the beam found under their
prefix, with its log-probability: the model never learnt their counter, so the beam alone rarely keeps
them. So do the `retrieve.untrained_by_cosine` of them most similar to the query by the run's embeddings,
found by the beam or not, each with the log-probability of its most similar trained item.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cart import files
from cart.data import corpus, pairs
from cart.devices import pick_device
from cart.errors import CartError
from cart.model.decoding import decode_texts, score_identifiers
from cart.retrieve.rerank import Reranker, item_embeddings, lexical_index
from cart.settings import RetrieveConfig


@dataclass
class Hit:
    id: str
    path: str
    score: float  # log-probability of the item's identifier under the model (with rerank: the rerank score)
    row: int  # the item's row in corpus.jsonl


class Retriever:
    def __init__(self, model, tokenizer, ids, records: list[dict], *, beam_width: int, max_query_tokens: int,
                 device: torch.device, top_k: int = 10, batch_size: int = RetrieveConfig.batch_size,
                 manifest: dict | None = None, reranker: Reranker | None = None, rerank_candidates: int | None = None,
                 run_dir: Path | None = None, untrained_by_cosine: int = RetrieveConfig.untrained_by_cosine):
        self.model = model.to(device).eval()
        self.run_dir = run_dir
        self.tokenizer, self.ids, self.records = tokenizer, ids, records
        self.beam_width, self.max_query_tokens, self.device = beam_width, max_query_tokens, device
        self.rerank_candidates = max(beam_width, rerank_candidates or beam_width)  # the rerank's beams
        self.top_k, self.batch_size = top_k, batch_size  # the run's defaults
        self.manifest = manifest or {}  # the model's: its sha256, the inputs it was trained on, its config
        self.reranker = reranker  # when reranking
        self.untrained_by_cosine = untrained_by_cosine
        # the rows `cart add` added that the model was not trained on; row -> those under its prefix (all but
        # the counter); and each one's most similar trained row, whose identifier scores it when cosine finds it
        self.untrained: dict[int, list[int]] = {}
        self.untrained_rows = np.empty(0, dtype=np.int64)
        self.stand_ins = np.empty(0, dtype=np.int64)
        if run_dir is not None:
            added = set(files.read_manifest(Path(run_dir) / files.CORPUS).get("added_items", []))
            added -= set(self.manifest.get("trained_added", []))
            self.untrained_rows = np.array([row for row, r in enumerate(records) if r["id"] in added], dtype=np.int64)
            prefixes = [tuple(row) for row in ids.codes[:, :-1].tolist()]
            under: dict[tuple, list[int]] = {}
            for row in self.untrained_rows.tolist():
                under.setdefault(prefixes[row], []).append(row)
            if under:
                self.untrained = {row: under[p] for row, p in enumerate(prefixes) if p in under}
        if reranker is not None and 0 < len(self.untrained_rows) < len(records):
            self.stand_ins = _most_similar_trained(reranker.items, self.untrained_rows)

    @classmethod
    def load(cls, run_dir: str | Path, beam_width: int | None = None, device: str = "auto",
             rerank: bool | None = None, rerank_candidates: int | None = None,
             untrained_by_cosine: int | None = None) -> "Retriever":
        """The run's best model, tokenizer, identifiers and corpus; beam width, query length, rerank and its
        candidates (never fewer than the beam width, and the untrained items cosine adds) default to the
        values the model was trained and validated with."""
        from cart.model import model_io

        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise CartError(f"run folder not found: {run_dir}")
        model, tokenizer, ids = model_io.load(run_dir)
        manifest = files.read_manifest(run_dir / files.MODEL_WEIGHTS)
        config = manifest["config"]
        beam_width = config["retrieve"]["beam_width"] if beam_width is None else beam_width
        if beam_width < 1:
            raise CartError(f"beam width must be at least 1, got {beam_width}")
        if rerank_candidates is None:  # runs trained before the setting re-ranked the beam itself
            rerank_candidates = config["retrieve"].get("rerank_candidates", beam_width)
        if untrained_by_cosine is None:  # runs trained before the setting: its default
            untrained_by_cosine = config["retrieve"].get("untrained_by_cosine", RetrieveConfig.untrained_by_cosine)
        if isinstance(untrained_by_cosine, bool) or not isinstance(untrained_by_cosine, int) or untrained_by_cosine < 0:
            raise CartError(f"untrained_by_cosine must be a whole number, at least 0, got {untrained_by_cosine!r}")
        device = pick_device(device)
        rerank = config["retrieve"].get("rerank", False) if rerank is None else rerank
        records = corpus.read(run_dir)
        reranker = _reranker(run_dir, manifest, records, device) if rerank else None
        return cls(model, tokenizer, ids, records, beam_width=beam_width,
                   max_query_tokens=config["model"]["max_query_tokens"], device=device,
                   top_k=config["retrieve"]["top_k"],
                   batch_size=config["retrieve"].get("batch_size", RetrieveConfig.batch_size),
                   manifest=manifest, reranker=reranker, rerank_candidates=rerank_candidates, run_dir=run_dir,
                   untrained_by_cosine=untrained_by_cosine)

    def reloaded(self) -> "Retriever":
        """This retriever's model (and rerank's encoder) over the run's items as they are now: after `cart add`
        or `cart remove` changed them. The model's files are not read again."""
        from cart.model import model_io

        ids = model_io.fitting_identifiers(self.run_dir, self.manifest)
        records = corpus.read(self.run_dir)
        reranker = None
        if self.reranker is not None:
            reranker = _reranker(self.run_dir, self.manifest, records, self.device, self.reranker.encoder)
        return Retriever(self.model, self.tokenizer, ids, records, beam_width=self.beam_width,
                         max_query_tokens=self.max_query_tokens, device=self.device, top_k=self.top_k,
                         batch_size=self.batch_size, manifest=self.manifest, reranker=reranker,
                         rerank_candidates=self.rerank_candidates, run_dir=self.run_dir,
                         untrained_by_cosine=self.untrained_by_cosine)

    def search(self, queries: str | list[str], k: int | None = None, batch_size: int | None = None) -> list[list[Hit]]:
        """Ranked items for each query, best first (fewer than k when the beams found fewer); k and the
        batch size default to the run's `retrieve.top_k` and `retrieve.batch_size`."""
        if isinstance(queries, str):
            queries = [queries]
        rows, scores = self.search_rows(queries, min(self.top_k, self.beam_width) if k is None else k, batch_size)
        return [[Hit(self.records[r]["id"], self.records[r]["path"], float(s), int(r))
                 for r, s in zip(row, score) if r >= 0] for row, score in zip(rows, scores)]

    def search_rows(self, queries: list[str], k: int, batch_size: int | None = None,
                    rerank: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) corpus rows (-1 where the beams found fewer than k items) and their log-probabilities
        (with rerank, the candidates of `rerank_candidates` beams re-ordered by the rerank score, and that
        score). `batch_size` and `rerank`: default the retriever's."""
        batch_size = self.batch_size if batch_size is None else batch_size
        rerank = self.reranker is not None if rerank is None else rerank
        if rerank and self.reranker is None:
            raise CartError("this retriever was loaded without rerank: Retriever.load(run, rerank=True)")
        for name, value in (("k", k), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise CartError(f"{name} must be a whole number, got {value!r}")
        beams = self.rerank_candidates if rerank else self.beam_width
        if k > beams:
            raise CartError(f"k={k} is larger than the beam width {beams}: pass a larger beam width")
        if k < 1:
            raise CartError(f"k must be at least 1, got {k}")
        if batch_size < 1:
            raise CartError(f"batch size must be at least 1, got {batch_size}")
        if isinstance(queries, str) or not isinstance(queries, (list, tuple)):
            raise CartError(f"queries must be a list of texts, got {type(queries).__name__}")
        for i, query in enumerate(queries):
            if not isinstance(query, str) or not query.strip():
                raise CartError(f"query {i + 1} is empty")
        rows, scores = [], []
        for start in range(0, len(queries), batch_size):
            batch = queries[start: start + batch_size]
            items, item_scores = decode_texts(self.model, self.tokenizer, self.ids.trie, batch,
                                              beams=beams, top_k=beams if rerank else k,
                                              max_tokens=self.max_query_tokens, device=self.device)
            if rerank:
                vectors = self.reranker.query_vectors(batch)
                items, item_scores = self.reranker(batch, *self._with_untrained(batch, vectors, items, item_scores),
                                                   vectors)
            rows.append(items[:, :k])
            scores.append(item_scores[:, :k])
        if not rows:
            return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)
        return np.concatenate(rows), np.concatenate(scores)

    def _with_untrained(self, queries: list[str], vectors: torch.Tensor, rows: np.ndarray,
                        scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Beam candidates (Q, C) and log-probabilities, each query's followed by the untrained items under
        its candidates' prefixes, scored as the candidate, then by the `untrained_by_cosine` untrained items
        most similar to the query (`vectors`, its query vector) not among them yet, scored as their most
        similar trained item (-1 / -inf pad the rows to one width)."""
        picks, pick_scores = self._untrained_by_cosine(queries, vectors)
        if not self.untrained and not picks.size:
            return rows, scores
        joined = []
        for row, score, picked, picked_scores in zip(rows.tolist(), scores.tolist(), picks.tolist(), pick_scores.tolist()):
            extra: dict[int, float] = {}  # each once, with its best candidate's score (they come best first)
            beam = set(row)
            for r, s in zip(row, score):
                for other in self.untrained.get(r, ()):  # the padding row -1 has none
                    if other not in beam:
                        extra.setdefault(other, s)
            for other, s in zip(picked, picked_scores):
                if other not in beam:
                    extra.setdefault(other, s)
            joined.append((row + list(extra), score + list(extra.values())))
        width = max(len(r) for r, _ in joined)
        out_rows = np.full((len(joined), width), -1, dtype=np.int64)
        out_scores = np.full((len(joined), width), -np.inf, dtype=np.float32)
        for i, (r, s) in enumerate(joined):
            out_rows[i, :len(r)], out_scores[i, :len(s)] = r, s
        return out_rows, out_scores

    def _untrained_by_cosine(self, queries: list[str], vectors: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(Q, m) the untrained rows most similar to each query and the log-probability of each one's most
        similar trained item's identifier under the query: the model's belief in the place the item sits,
        since it never learnt the item itself. (Q, 0) when there are none or the setting is 0."""
        count = min(self.untrained_by_cosine, len(self.stand_ins))
        if not count:
            return np.empty((len(queries), 0), dtype=np.int64), np.empty((len(queries), 0), dtype=np.float32)
        similarity = vectors @ self.reranker.items[torch.from_numpy(self.untrained_rows)].float().T  # (Q, U)
        chosen = similarity.topk(count, dim=1).indices.numpy()  # (Q, m)
        log_probs = score_identifiers(self.model, self.tokenizer, queries, self.ids.tokens[self.stand_ins[chosen]],
                                      max_tokens=self.max_query_tokens, device=self.device)  # each query its own
        return self.untrained_rows[chosen], log_probs

    def score_rows(self, queries: list[str], rows) -> np.ndarray:
        """(Q, C) how well each of the corpus rows `rows` answers each query, beam search or not: with
        rerank the cosine of the query's and the item's embeddings, else the log-probability of the
        item's identifier under the model (what beam search reports when it finds it)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.reranker is not None:
            vectors = self.reranker.encoder.encode_text(queries).float()
            return (vectors @ self.reranker.items[torch.from_numpy(rows)].float().T).numpy()
        return score_identifiers(self.model, self.tokenizer, queries, self.ids.tokens[rows],
                                 max_tokens=self.max_query_tokens, device=self.device)

    def reads(self, query: str) -> bool:
        """False when the tokenizer knows no word in `query` (every token unknown, e.g. a script or emoji
        outside its vocabulary, or a special token such as [CLS]): the model then sees the same empty input
        for every such query."""
        tokens = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        return any(token not in self.tokenizer.all_special_ids for token in tokens)

    def warning(self, query: str) -> str | None:
        """What to tell the user about `query` before its results: None, or that they mean nothing."""
        if self.reads(query):
            return None
        return (f"the model's tokenizer knows no word of the query {query!r} (only unknown characters or special "
                f"tokens): these results mean nothing")


def _reranker(run_dir: Path, manifest: dict, records: list[dict], device: torch.device, encoder=None) -> Reranker:
    """The rerank of the run: its query encoder (`encoder`, when one is loaded already), item embeddings and
    BM25 index of the training texts it trained on, and the weights training chose."""
    from cart.encoders import query_encoder
    from cart.settings import EmbedConfig

    weight = manifest.get("rerank_weight")
    if weight is None and manifest["config"]["retrieve"].get("rerank"):
        raise CartError(f"{run_dir / files.MODEL_WEIGHTS} has no rerank weight yet (training ends by choosing it): "
                        f"run `cart train` again to finish")
    if weight is None:
        raise CartError(f"{run_dir / files.MODEL_WEIGHTS} was trained without a rerank weight: train with "
                        f"retrieve.rerank=true to rerank")
    # the embeddings it chose the weights on, or those `cart add` / `cart remove` made of them
    files.require_built_from(manifest, files.MODEL_WEIGHTS, run_dir, files.EMBEDDINGS, extended=True)
    stored = manifest["config"]
    records, _ = pairs.with_generated_captions(run_dir, records)
    if "held_out_texts" in manifest:  # the texts validation held out, named by item id
        held_out = pairs.held_out_rows(records, manifest["held_out_texts"])
    else:  # a model trained before they were kept: drawn again as training drew them
        held_out = pairs.held_out_texts(records, pairs.splits_config(stored))
    index = lexical_index(records, held_out)
    encoder = encoder or query_encoder(EmbedConfig(**stored["embed"]), device)
    return Reranker(encoder, item_embeddings(run_dir), index,
                    weight, manifest.get("rerank_lexical_weight", 0.0))


def format_hits(query: str, hits: list[Hit]) -> str:
    """A query and its ranked items as indented lines: rank, log-probability, id, path."""
    return "\n".join([query] + [f"  {rank:>3}  {hit.score:>9.3f}  {hit.id:<24} {hit.path}"
                                for rank, hit in enumerate(hits, 1)])


def _most_similar_trained(items: torch.Tensor, untrained: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each untrained row, the trained row (every row not in `untrained`) whose embedding is most
    similar: items (N, D), L2-normalised; a chunk of untrained rows at a time."""
    trained = np.setdiff1d(np.arange(len(items)), untrained)
    corpus = items[torch.from_numpy(trained)].float()
    nearest = [(items[torch.from_numpy(untrained[start: start + chunk])].float() @ corpus.T).argmax(dim=1).numpy()
               for start in range(0, len(untrained), chunk)]
    return trained[np.concatenate(nearest)]
