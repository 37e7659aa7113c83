"""Stage `cart train`: learn query text -> identifier with one accelerate loop, for every config.

Reads `corpus.jsonl`, the identifiers (`ids.safetensors`, `trie.marisa`) and `captions.jsonl` when
`cart caption` has run. Writes:
- `model/`: the CartT5 and its tokenizer (`load(run_dir)` gives them back in one call), the best one by
  the validation score (MRR@10 averaged over the validation splits); `model/model.manifest.json` names the
  corpus and identifiers it was trained on;
- `state/step_N/`: resumable accelerate states (model, optimiser, scheduler, RNG, `trainer.json`);
- `validation.jsonl`: the validation pairs of each split (`cart/data/pairs.py`), carved from the training texts
  (never held-out queries);
- `train.json`: the history of every validation and the final figures.

Run it as `cart train` or `accelerate launch -m cart train` on 1..N processes: `train.batch_size` is the
global batch of one optimiser step, split over the processes. Started again with the same command, a
run continues from its newest state; each step reseeds dropout from (seed, step, process), so a resumed
run ends with the same weights as an uninterrupted one.

`cart train --continue` trains the run's model further on the items `cart add` added since it was
trained, with `train.replay` times as many of the old items' pairs (DSI++), validated on the splits the
model was first validated on; it writes no states (a killed one starts again).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cart import files
from cart.config import Config, to_dict
from cart.data import corpus, pairs
from cart.devices import require_memory
from cart.encoders import query_encoder
from cart.errors import CartError
from cart.index import build_ids
from cart.index.build_ids import Identifiers
from cart.model import batches
from cart.model.cart_t5 import CartT5
from cart.model.decoding import decode_texts
from cart.model.losses import cart_loss
from cart.model.model_io import build_model, identifier_geometry, load_tokenizer, require_fitting, training_bytes
from cart.retrieve import scoring
from cart.retrieve.rerank import GRID, Reranker, item_embeddings, lexical_index, rerank
from cart.retrieve.scoring import DEPTH


PROGRESS_FILE = "trainer.json"  # in each state folder


@dataclass
class Progress:
    """Where a run stands, saved with each state (`trainer.json`) so that a resumed run carries on."""
    settings: dict  # what a state must share with a run to resume it (`_resume_settings`)
    step: int = 0  # optimiser steps done
    epoch: int = 0  # epochs done
    batches_done: int = 0  # of the current epoch
    best_score: float = -1.0
    best_step: int = 0  # 0: no model saved yet
    stale: int = 0  # validations since the best one
    history: list[dict] = field(default_factory=list)  # every validation

    def record(self, score: float | None) -> bool:
        """Note an epoch's validation score; True when its model is to be kept (the best so far, or the
        newest when nothing is validated)."""
        if score is None:
            self.best_step = self.step
            return True
        if score > self.best_score:
            self.best_score, self.best_step, self.stale = score, self.step, 0
            return True
        self.stale += 1
        return False


def run(cfg: Config, continue_training: bool = False) -> Path:
    """Train (or resume training) the run's model, or with `continue_training` train it further on the
    items added since; return the path of `model/`."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    run_dir, train_cfg = cfg.run_dir, cfg.train
    records, ids, inputs = read_inputs(run_dir, cfg, continue_training)
    previous, added = _continued(run_dir, records) if continue_training else (None, set())
    # the `texts` split, which rerank's BM25 leaves out too; continued training keeps its model's
    held_out = pairs.held_out_rows(records, previous["held_out_texts"]) if previous else pairs.held_out_texts(records, cfg)
    splits = pairs.split_pairs(records, cfg, held_out)
    if previous:
        splits.train = pairs.with_replay(splits.train, added, train_cfg.replay, cfg.seed)
    kept = {"held_out_texts": pairs.held_out_by_id(records, held_out)}  # in the model's manifest
    if previous:
        kept |= {"continued_from": previous["sha256"],
                  "trained_added": sorted({*previous.get("trained_added", []), *(records[row]["id"] for row in added)})}
    train_pairs = splits.train
    tokenizer = load_tokenizer(cfg)
    labels = batches.identifier_labels(ids.tokens)

    if train_cfg.tracker == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # no account or network needed; `wandb sync` later
    # the encoder's tuned layers wait for train.tune_after epochs: DDP must not expect their gradients before
    unused = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.model.tune_layers else []
    accelerator = Accelerator(
        kwargs_handlers=unused,
        gradient_accumulation_steps=train_cfg.gradient_accumulation,
        mixed_precision=_precision(train_cfg.mixed_precision),
        cpu=not torch.cuda.is_available(),
        log_with=None if train_cfg.tracker == "none" else train_cfg.tracker,
        project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=cfg.seed),
    )
    if train_cfg.batch_size % accelerator.num_processes:
        raise CartError(f"train.batch_size={train_cfg.batch_size} must be a multiple of the "
                        f"{accelerator.num_processes} processes")
    if accelerator.is_main_process:
        _write_validation(run_dir / files.VALIDATION, splits.validation, records)

    with torch.random.fork_rng():  # the initial weights depend on the seed alone, however the run started
        torch.manual_seed(cfg.seed)
        geometry = identifier_geometry(run_dir, ids) if cfg.model.geometry else None
        need = training_bytes(cfg, ids.layout.level_sizes, len(tokenizer), 0 if geometry is None else geometry.shape[1])
        require_memory(need, accelerator.device, f"the model (model.d_model={cfg.model.d_model}, model.d_ff="
                                                 f"{cfg.model.d_ff}, {cfg.model.num_layers} + {cfg.model.num_decoder_layers}"
                                                 f" layers), its gradients and AdamW's moments")
        if previous:  # the trained model goes on
            model = CartT5.from_pretrained(run_dir / files.MODEL, local_files_only=True).to(accelerator.device)
        else:
            model = build_model(cfg, ids.layout.level_sizes, len(tokenizer), geometry).to(accelerator.device)
    # the run's item embeddings and query encoder, read once: rerank's candidates, the ranking loss's negatives,
    # the distilled texts' labels and the interpolation's targets come from them
    items = item_embeddings(run_dir) if _reads_embeddings(cfg) else None
    encoder = query_encoder(cfg.embed, accelerator.device) if cfg.retrieve.rerank or train_cfg.distill_texts else None
    distilled, weights = None, None
    if train_cfg.distill_texts:
        texts = pairs.unlabelled_texts(train_cfg.distill_texts, records)
        if not texts:
            raise CartError(f"train.distill_texts: {train_cfg.distill_texts} has no text that is not already a text "
                            f"of the corpus")
        vectors = torch.cat([encoder.encode_text(texts[i: i + 256]).cpu()
                             for i in tqdm(range(0, len(texts), 256), desc="train: labelling unlabelled texts",
                                           unit=" batch", disable=not accelerator.is_main_process)])
        distilled = batches.Distilled(texts, vectors, items, train_cfg.distill_top_k, train_cfg.distill_temperature,
                                   train_cfg.distill_min_cosine, cfg.seed, train_cfg.distill_min_margin)
        if train_cfg.distill_weight != 1:
            weights = torch.cat([torch.ones(len(train_pairs.texts)),
                                 torch.full((len(distilled.texts),), train_cfg.distill_weight)])
        train_pairs = pairs.Pairs(train_pairs.texts + distilled.texts, train_pairs.items + distilled.draw(0))
        accelerator.print(f"train: {len(distilled.texts)} of {len(texts)} unlabelled texts distilled "
                          f"(best cosine >= {train_cfg.distill_min_cosine}, margin >= {train_cfg.distill_min_margin}; "
                          f"texts equal to a corpus text left out)")
    labelled = len(splits.train.texts)
    cache = None
    if train_cfg.cache_encoder and getattr(model.encoder, "frozen", False):
        cache = batches.LayerCache(model.encoder, tokenizer, train_pairs.texts, cfg.model.max_query_tokens,
                                accelerator.device)
        accelerator.print(f"train: the frozen encoder's layer outputs of {len(cache.index)} texts cached "
                          f"({cache.bytes / 2**20:.0f} MiB)")
    reranker = Reranker(encoder, items, lexical_index(records, held_out)) if cfg.retrieve.rerank else None
    validation = Validation(splits, cfg, reranker)
    negatives = batches.HardNegatives(items, train_pairs, splits.relevant, train_cfg.rank_negatives) \
        if train_cfg.rank_weight > 0 else None
    max_tokens = cfg.model.max_query_tokens
    grouped = batches.LengthGroupedBatches(batches.token_lengths(train_pairs.texts, tokenizer, max_tokens),
                                           train_cfg.batch_size, cfg.seed)
    soft = None
    if distilled is not None and train_cfg.distill_targets == "levels":
        soft = partial(distilled.level_targets, first=labelled, labels=labels, vocab_size=ids.layout.vocab_size)
    loader = DataLoader(list(range(len(train_pairs.texts))), batch_sampler=grouped,
                        collate_fn=lambda rows: batches.make_batch(rows, train_pairs, labels, tokenizer, max_tokens,
                                                                   cache, negatives, weights, soft))
    if len(loader) == 0:
        raise CartError(f"{len(train_pairs.texts)} training pairs make no full batch of "
                        f"train.batch_size={train_cfg.batch_size}")
    # a frozen encoder is not optimised; the top layers it tunes have their own rate and start later
    tuned = {id(p) for p in model.encoder.bert.parameters()} if cfg.model.tune_layers else set()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in tuned],
               "lr": train_cfg.learning_rate}]
    if tuned:
        groups.append({"params": [p for p in model.parameters() if p.requires_grad and id(p) in tuned],
                       "lr": train_cfg.encoder_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay)
    updates_per_epoch = math.ceil(len(loader) / train_cfg.gradient_accumulation)  # the last, partial one steps too
    total = max(1, updates_per_epoch * train_cfg.epochs)
    schedules = [_schedule(train_cfg.warmup_steps, total),
                 _schedule(train_cfg.warmup_steps, total, start=updates_per_epoch * train_cfg.tune_after)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules[: len(groups)])
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    settings = _resume_settings(cfg, inputs)
    progress = Progress(settings)
    if accelerator.is_main_process:  # what a killed save left behind
        files.finish_publish(run_dir / files.MODEL)
        files.remove_stale(run_dir, f".{files.MODEL}.*")
        files.remove_stale(run_dir / files.STATE, ".step_*")
    accelerator.wait_for_everyone()
    state = None if previous else _latest_state(run_dir)
    if state is not None:
        saved = json.loads((state / PROGRESS_FILE).read_text(encoding="utf-8"))
        changed = _differences(saved.get("settings", {}), settings)
        if changed:
            raise CartError(f"{state} was saved by a run with other settings or inputs ({'; '.join(changed[:3])}): "
                            f"remove {run_dir / files.STATE} to start again, or choose another run name")
        accelerator.load_state(str(state))
        progress = Progress(**saved)
        accelerator.print(f"train: resuming from {state} (epoch {progress.epoch}, step {progress.step})")
    if train_cfg.tracker != "none":
        accelerator.init_trackers("cart", config=_flat(to_dict(cfg)),
                                  init_kwargs={"wandb": {"name": cfg.run, "dir": str(run_dir)}} if train_cfg.tracker == "wandb" else {})

    validation_sizes = ", ".join(f"{len(p.texts)} {name}" for name, p in splits.validation.items())
    accelerator.print(f"train: {len(train_pairs.texts)} training pairs, validation pairs: {validation_sizes}; "
                      f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                      f"{accelerator.num_processes} process(es), {updates_per_epoch} steps an epoch")
    bar = tqdm(total=total, initial=progress.step, desc="train", unit=" step", disable=not accelerator.is_main_process)
    seen, clock = 0, time.perf_counter()
    stop = progress.stale >= train_cfg.patience > 0
    while progress.epoch < train_cfg.epochs and not stop:
        loader.set_epoch(progress.epoch)
        if distilled is not None:  # this epoch's draw of the distilled texts' items
            train_pairs.items[labelled:] = distilled.draw(progress.epoch)
        grouped.set_epoch(progress.epoch)  # accelerate does not reach it once it wraps it for N processes
        epoch_batches = accelerator.skip_first_batches(loader, progress.batches_done) if progress.batches_done else loader
        if cfg.model.tune_layers:  # the encoder's top layers train after the frozen warm-up
            accelerator.unwrap_model(model).encoder.tuning = progress.epoch >= train_cfg.tune_after
        model.train()
        for batch in epoch_batches:
            # dropout masks depend only on (seed, epoch, batch, process): a resumed run draws the same ones
            torch.manual_seed(hash((cfg.seed, progress.epoch, progress.batches_done, accelerator.process_index)))
            with accelerator.accumulate(model):
                ranking = train_cfg.rank_weight if progress.epoch >= train_cfg.rank_after else 0.0
                if train_cfg.interpolation:
                    batch["encoder_layers"] = batches.toward_targets(batch["encoder_layers"], batch["attention_mask"],
                                                                  items[batch["items"]].to(accelerator.device),
                                                                  train_cfg.interpolation,
                                                                  train_cfg.interpolation_share)
                loss = cart_loss(model, batch, train_cfg.rdrop_weight, ranking)
                _require_finite_loss(accelerator, loss.total, progress, cfg)
                accelerator.backward(loss.total)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress.batches_done += 1
            seen += len(batch["labels"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            bar.update(1)
            if progress.step % train_cfg.log_every == 0:
                pairs_per_second = seen / (time.perf_counter() - clock)
                bar.set_postfix(loss=f"{loss.total.item():.3f}", pairs_s=f"{pairs_per_second:.0f}")
                accelerator.log({"loss": loss.total.item(), "cross_entropy": loss.cross_entropy.item(),
                                 "kl": loss.kl.item(), "rank": loss.rank.item(), "learning_rate": scheduler.get_last_lr()[0],
                                 "pairs_per_second": pairs_per_second}, step=progress.step)
            if progress.step % train_cfg.save_every == 0 and not previous:
                _save_state(accelerator, model, run_dir, progress, train_cfg.keep_states)
        progress.epoch += 1
        progress.batches_done = 0
        if progress.epoch >= min(train_cfg.validate_from, train_cfg.epochs):
            score = _validate(accelerator, model, tokenizer, ids, validation, progress)
            if progress.record(score):
                _save_model(accelerator, model, tokenizer, cfg, inputs, progress, kept)
        stop = progress.stale >= train_cfg.patience > 0
        if not previous:
            _save_state(accelerator, model, run_dir, progress, train_cfg.keep_states)
    bar.close()
    if progress.best_step == 0:  # no validation happened (no epochs left): keep what we have
        _save_model(accelerator, model, tokenizer, cfg, inputs, progress, kept)
    reranked = None
    if validation.reranker is not None:  # `retrieve.rerank`: the kept model's weights, chosen once
        reranked = _choose_rerank_weight(accelerator, validation, tokenizer, ids)
    accelerator.end_training()
    out = run_dir / files.MODEL
    if accelerator.is_main_process:
        summary = {"best_validation_score": progress.best_score, "best_step": progress.best_step,
                   "steps": progress.step, "epochs": progress.epoch, "history": progress.history,
                   "training_pairs": len(train_pairs.texts),
                   "validation_pairs": {name: len(p.texts) for name, p in splits.validation.items()},
                   **({"rerank": reranked} if reranked else {})}
        files.write_text(run_dir / files.TRAIN_LOG, json.dumps(summary, indent=2) + "\n")
        print(f"train: best validation score {progress.best_score:.3f} at step {progress.best_step} -> {out}")
    return out


def read_inputs(run_dir: Path, cfg: Config, continuing: bool = False) -> tuple[list[dict], Identifiers, dict[str, str]]:
    """The corpus (with generated captions merged in), the identifiers, and their hashes; refuses
    identifiers that were not built from this corpus, and item-text embeddings that know this run's
    validation texts (`continuing`: those of the model that goes on, which `cart add` kept)."""
    records = corpus.read(run_dir)
    ids = build_ids.load(run_dir)
    _, embed_manifest = files.verified_input(run_dir, files.EMBEDDINGS)
    files.require_built_from(embed_manifest, files.EMBEDDINGS, run_dir, files.CORPUS)
    if embed_manifest.get("encoder") == "minilm-text" and not continuing and (
            embed_manifest.get("validation_left_out") != pairs.held_out_digest(pairs.held_out_texts(records, cfg))):
        raise CartError(f"{run_dir / files.EMBEDDINGS} embedded other validation texts than this run holds out "
                        f"(seed or train.validation_* changed): rerun `cart embed` and `cart ids`")
    if len(ids.codes) != len(records):
        raise CartError(f"{run_dir / files.IDS} has {len(ids.codes)} identifiers for {len(records)} corpus items: "
                        f"rerun `cart embed` and `cart ids`")
    read = (files.CORPUS, files.IDS) + ((files.EMBEDDINGS,) if _reads_embeddings(cfg) else ())
    inputs = {name: files.verified_input(run_dir, name)[1]["sha256"] for name in read}
    if cfg.train.distill_texts:
        inputs["distill_texts"] = files.sha256_file(Path(cfg.train.distill_texts).expanduser())
    records, captions_sha = pairs.with_generated_captions(run_dir, records)
    if captions_sha:
        inputs[files.CAPTIONS] = captions_sha
    return records, ids, inputs


def _continued(run_dir: Path, records: list[dict]) -> tuple[dict, set[int]]:
    """What `cart train --continue` goes on from: the run's model's manifest, and the rows of the items
    `cart add` added that it was not trained on."""
    _, manifest = files.verified_input(run_dir, files.MODEL_WEIGHTS)
    require_fitting(run_dir, manifest)  # its own identifiers, or made of its own by `cart add`
    if "held_out_texts" not in manifest:
        raise CartError(f"{run_dir / files.MODEL_WEIGHTS} was trained before --continue existed (it names no "
                        f"held-out texts): train the run again")
    added = set(files.read_manifest(run_dir / files.CORPUS).get("added_items", [])) - set(manifest.get("trained_added", []))
    rows = {row for row, record in enumerate(records) if record["id"] in added}
    if not rows:
        raise CartError(f"no item was added (`cart add`) to {run_dir} since its model was trained: nothing to continue on")
    return manifest, rows


def _reads_embeddings(cfg: Config) -> bool:
    """Whether training reads the item embeddings, which then are one of the model's inputs."""
    return bool(cfg.model.geometry or cfg.retrieve.rerank or cfg.train.rank_weight > 0 or cfg.train.distill_texts
                or cfg.train.interpolation)


def ranked_items(model, tokenizer, ids: Identifiers, texts: list[str], cfg: Config, device: torch.device,
                 depth: int = DEPTH, beams: int | None = None, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The top `depth` items of constrained beam search with `beams` beams (default `retrieve.beam_width`;
    fewer items with fewer beams) for each text, and their log-probabilities: (n, depth) each, -1 / -inf where
    the beams found fewer."""
    beams = beams or cfg.retrieve.beam_width
    depth = min(depth, beams)
    rows, scores = np.full((len(texts), depth), -1), np.full((len(texts), depth), -np.inf)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of like length pad less
    for start in range(0, len(texts), batch_size):
        batch = order[start: start + batch_size]
        rows[batch], scores[batch] = decode_texts(model, tokenizer, ids.trie, [texts[i] for i in batch],
                                                  beams=beams, top_k=depth,
                                                  max_tokens=cfg.model.max_query_tokens, device=device)
    return rows, scores


TRAIN_SAMPLE = 200  # training pairs decoded after each epoch for the training-query R@1


class Validation:
    """The validation splits' figures: R@1, R@5, R@10, MRR@10 of beam search after each epoch and, with
    `retrieve.rerank`, of the candidates of a beam search with `retrieve.rerank_candidates` beams re-ranked
    (`cart.rerank`) at each pair of weights of GRID for the kept model; each process decodes its share."""

    def __init__(self, splits: pairs.Splits, cfg: Config, reranker: Reranker | None = None):
        """reranker: the run's rerank (its weights to be chosen), with `retrieve.rerank`."""
        self.splits, self.cfg, self.reranker = splits, cfg, reranker

    def _mine(self, accelerator, split: pairs.Pairs) -> tuple[list[str], list[set[int]]]:
        """This process's share of a split's queries and each one's right answers."""
        texts = [split.texts[i] for i in range(accelerator.process_index, len(split.texts), accelerator.num_processes)]
        return texts, [self.splits.relevant[t.lower()] for t in texts]

    def __call__(self, accelerator, model, tokenizer, ids) -> tuple[dict, float]:
        """(figures per split, training-query R@1) of beam search."""
        totals = {}
        for name, split in self.splits.validation.items():
            texts, relevant = self._mine(accelerator, split)
            rows, _ = ranked_items(model, tokenizer, ids, texts, self.cfg, accelerator.device)
            totals[name] = scoring.totals(rows, relevant)
        train = self.splits.train  # how well it fits its own training queries: a sample tells enough
        sample = random.Random(self.cfg.seed).sample(range(len(train.texts)), min(len(train.texts), TRAIN_SAMPLE))
        mine = sample[accelerator.process_index::accelerator.num_processes]
        rows, _ = ranked_items(model, tokenizer, ids, [train.texts[i] for i in mine], self.cfg, accelerator.device)
        totals["train"] = scoring.totals(rows, [self.splits.relevant[train.texts[i].lower()] for i in mine])
        summed = {name: self._sum(accelerator, t) for name, t in totals.items()}
        figures = {name: scoring.from_totals(t) for name, t in summed.items() if name != "train"}
        return figures, scoring.from_totals(summed["train"])["R@1"]

    def reranked(self, accelerator, model, tokenizer, ids) -> dict | None:
        """The rerank weights of GRID (log-probability, lexical) with the best MRR@10 averaged over the splits,
        and their figures per split (None with no split): the candidates of `retrieve.rerank_candidates`
        beams re-ordered."""
        candidates, totals = self.cfg.retrieve.rerank_candidates, {}
        for name, split in self.splits.validation.items():
            texts, relevant = self._mine(accelerator, split)
            rows, scores = ranked_items(model, tokenizer, ids, texts, self.cfg, accelerator.device, candidates,
                                        candidates)
            cosine, lexical = self.reranker.features(texts, rows) if texts else (rows * 0.0, rows * 0.0)
            totals[name] = np.stack([scoring.totals(rerank(rows, scores, cosine, lexical, w, v)[0][:, :DEPTH], relevant)
                                     for w, v in GRID])
        if not totals:
            return None
        totals = {name: self._sum(accelerator, t) for name, t in totals.items()}
        by_weights = [{name: scoring.from_totals(t[i]) for name, t in totals.items()} for i in range(len(GRID))]
        best = max(range(len(GRID)), key=lambda i: np.mean([f["MRR@10"] for f in by_weights[i].values()]))
        return {"weight": GRID[best][0], "lexical_weight": GRID[best][1], **by_weights[best]}

    @staticmethod
    def _sum(accelerator, totals: np.ndarray) -> np.ndarray:
        return accelerator.reduce(torch.tensor(totals, dtype=torch.float64, device=accelerator.device),
                                  reduction="sum").cpu().numpy()


def _validate(accelerator, model, tokenizer, ids, validation: Validation, progress: Progress) -> float | None:
    """The validation figures after an epoch, logged, printed and added to the history; returns the score:
    MRR@10 of beam search averaged over the splits, V, texts and names alike (None with no split)."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    figures, train_r1 = validation(accelerator, unwrapped, tokenizer, ids)
    unwrapped.train()
    score = float(np.mean([f["MRR@10"] for f in figures.values()])) if figures else None
    progress.history.append({"epoch": progress.epoch, "step": progress.step, "validation": figures, "score": score,
                             "train_r1": train_r1})
    accelerator.log({"train_r1": train_r1, **({"validation_score": score} if figures else {}),
                     **{f"{name}_{k}": v for name, f in figures.items() for k, v in f.items()}}, step=progress.step)
    shown = "; ".join(f"{name} R@1 {f['R@1']:.3f} R@10 {f['R@10']:.3f} MRR@10 {f['MRR@10']:.3f}"
                      for name, f in figures.items())
    accelerator.print(f"train: epoch {progress.epoch} step {progress.step}: validation {shown or 'none'}; "
                      f"training-query R@1 {train_r1:.3f}")
    return score


def _choose_rerank_weight(accelerator, validation: Validation, tokenizer, ids) -> dict | None:
    """With `retrieve.rerank`, once training ends: the rerank weight of the kept model, chosen on the
    validation splits (one decode with `retrieve.rerank_candidates` beams), written into its manifest;
    returns it with its figures (None with no validation split)."""
    accelerator.wait_for_everyone()
    run_dir = validation.cfg.run_dir
    kept = CartT5.from_pretrained(run_dir / files.MODEL, local_files_only=True).to(accelerator.device).eval()
    reranked = validation.reranked(accelerator, kept, tokenizer, ids)
    if reranked is None:
        return None
    if accelerator.is_main_process:
        files.update_manifest(run_dir / files.MODEL_WEIGHTS, rerank_weight=reranked["weight"],
                              rerank_lexical_weight=reranked["lexical_weight"])
    accelerator.wait_for_everyone()
    accelerator.print(f"train: rerank weights {reranked['weight']} (log-probability), {reranked['lexical_weight']} "
                      f"(BM25), {validation.cfg.retrieve.rerank_candidates} candidates: "
                      + "; ".join(f"{name} R@1 {f['R@1']:.3f} MRR@10 {f['MRR@10']:.3f}"
                                  for name, f in reranked.items() if isinstance(f, dict)))
    return reranked


def _require_finite_loss(accelerator, loss: torch.Tensor, progress: Progress, cfg: Config) -> None:
    """Stop training at a loss that is NaN or infinite (on any process), before it reaches the weights:
    what was saved before stays the last good state and model."""
    finite = torch.isfinite(loss.detach()).reshape(1).float()
    if accelerator.num_processes > 1:  # every process stops together, or the others wait for it forever
        finite = accelerator.gather(finite).min()
    if finite.item() == 1:
        return
    kept = [str(p) for p in (_latest_state(cfg.run_dir), cfg.run_dir / files.MODEL) if p is not None and p.exists()]
    raise CartError(f"the loss became NaN or infinite at step {progress.step + 1} (epoch {progress.epoch + 1}, batch "
                    f"{progress.batches_done + 1}): training stopped, "
                    + (f"keeping {' and '.join(kept)}" if kept else "nothing was saved yet")
                    + f"; lower train.learning_rate ({cfg.train.learning_rate}) or check the data")


def _require_finite_weights(model, progress: Progress) -> None:
    """Refuse to save weights that are NaN or infinite (a step that diverged): they would answer nothing."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CartError(f"the weights are not finite after step {progress.step}: training diverged and nothing "
                        f"was saved; lower train.learning_rate and start again")


def _save_model(accelerator, model, tokenizer, cfg: Config, inputs: dict, progress: Progress, kept: dict) -> None:
    """Write the model, its tokenizer and its manifest (which hashes every file of the folder; `kept` adds
    the texts validation held out, by item id as `cart add` moves rows, and what a continued training went
    on from) under a temporary name, then publish them as `model/` in one step: a model always exists, old
    or new."""
    _require_finite_weights(model, progress)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = cfg.run_dir / files.MODEL
        tmp = files.staging_folder(out)
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = Path(files.MODEL_WEIGHTS).name
        files.write_manifest(tmp / weights, "train", to_dict(cfg), inputs, step=progress.step,
                             validation_score=progress.best_score, rerank_weight=None,  # both chosen at the end
                             rerank_lexical_weight=None, **kept,
                             companions=files.folder_hashes(tmp, files.MODEL, leave_out=(weights,)))
        files.publish_folder(tmp, out)
    accelerator.wait_for_everyone()


def _save_state(accelerator, model, run_dir: Path, progress: Progress, keep: int) -> None:
    """Every process saves into a temporary folder, then the first publishes it as state/step_N: a folder
    named step_N is complete."""
    _require_finite_weights(model, progress)
    out = run_dir / files.STATE / f"step_{progress.step}"
    tmp = files.staging_folder(out)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        files.write_text(tmp / PROGRESS_FILE, json.dumps(asdict(progress), indent=2) + "\n")
        files.publish_folder(tmp, out)
        for old in _states(run_dir)[: -max(1, keep)]:
            files.remove_folder(old)
    accelerator.wait_for_everyone()


def _states(run_dir: Path) -> list[Path]:
    """Complete state folders, oldest first."""
    folders = [p for p in (run_dir / files.STATE).glob("step_*") if (p / PROGRESS_FILE).exists()]
    return sorted(folders, key=lambda p: int(p.name.split("_")[1]))


def _latest_state(run_dir: Path) -> Path | None:
    states = _states(run_dir)
    return states[-1] if states else None


def _resume_settings(cfg: Config, inputs: dict) -> dict:
    """What a state must share with this run to be resumed: the inputs and every setting that changes the
    weights (not the epoch count, patience, when validation starts, tracker, save/log frequencies, or
    validation's beam width)."""
    settings = to_dict(cfg)
    train = {k: v for k, v in settings["train"].items()
             if k not in ("epochs", "patience", "validate_from", "tracker", "save_every", "keep_states", "log_every")}
    return json.loads(json.dumps({"inputs": inputs, "model": settings["model"], "train": train, "seed": cfg.seed}))


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'key: saved -> now' for every setting that differs between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _schedule(warmup: int, total: int, start: int = 0):
    """Zero before step `start`, then a linear warm-up, then cosine decay to zero at the last planned step."""
    def factor(step: int) -> float:
        step -= start
        if step < 0:
            return 0.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - start - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "no"  # CPU autocast is slower than float32 on the cores we have measured
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _write_validation(path: Path, splits: dict[str, pairs.Pairs], records: list[dict]) -> None:
    lines = [json.dumps({"split": name, "text": text, "id": records[item]["id"]}, ensure_ascii=False) + "\n"
             for name, split in splits.items() for text, item in zip(split.texts, split.items)]
    files.write_text(path, "".join(lines))
