"""Stage `cart train`: learn query text -> identifier with one accelerate loop, for every config.

Reads `corpus.jsonl`, the identifiers (`ids.safetensors`, `trie.marisa`) and `captions.jsonl` when
`cart caption` has run. Writes:
- `model/`: the CartT5 and its tokenizer (`load(run_dir)` gives them back in one call), the best one by
  validation R@1; `model/model.manifest.json` names the corpus and identifiers it was trained on;
- `state/step_N/`: resumable accelerate states (model, optimiser, scheduler, RNG, `trainer.json`);
- `validation.jsonl`: the validation pairs, carved from the training texts (never held-out queries);
- `train.json`: the history of every validation and the final figures.

Run it as `cart train` or `accelerate launch -m cart train` on 1..N processes: `train.batch_size` is the
global batch of one optimiser step, split over the processes. Started again with the same command, a
run continues from its newest state; each step reseeds dropout from (seed, step, process), so a resumed
run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, DataLoader
from tqdm import tqdm

from cart import build_ids, corpus, files
from cart.build_ids import Identifiers
from cart.config import MINILM_DIM, Config, to_dict
from cart.decoding import decode
from cart.encoders import minilm_dir
from cart.errors import CartError
from cart.fusion import CartT5, cart_config
from cart.losses import cart_loss


@dataclass
class Pairs:
    texts: list[str]
    items: list[int]  # corpus row of each text's item (= row of its identifier)


class LengthGroupedBatches(BatchSampler):
    """Shuffled batches of similar token length: the padded memory, whose keys and values every decoder
    layer projects, shrinks from the longest text of a random batch (the joined tags) to the batch's own.
    Each epoch: shuffle, sort windows of 50 batches by length, cut, shuffle the batches; full batches
    only. The order depends on (seed, epoch) alone, so a resumed run skips into the same epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 50):
        super().__init__(range(len(lengths)), batch_size, drop_last=True)
        self.lengths, self.seed, self.window, self.epoch = lengths, seed, window, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(f"{self.seed}/{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        order = order[: len(self) * self.batch_size]
        span = self.window * self.batch_size
        order = [i for start in range(0, len(order), span)
                 for i in sorted(order[start: start + span], key=self.lengths.__getitem__)]
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        yield from batches


def run(cfg: Config) -> Path:
    """Train (or resume training) the run's model; return the path of `model/`."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    run_dir, t = cfg.run_dir, cfg.train
    records, ids, inputs = read_inputs(run_dir)
    train_pairs, val_pairs, relevant = split_pairs(records, cfg)
    tokenizer = load_tokenizer(cfg)
    labels = torch.from_numpy(ids.tokens)  # (N, L) identifier tokens; EOS is appended per batch

    if t.tracker == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # no account or network needed; `wandb sync` later
    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation,
        mixed_precision=_precision(t.mixed_precision),
        cpu=not torch.cuda.is_available(),
        log_with=None if t.tracker == "none" else t.tracker,
        project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=cfg.seed),
    )
    if t.batch_size % accelerator.num_processes:
        raise CartError(f"train.batch_size={t.batch_size} must be a multiple of the {accelerator.num_processes} processes")
    if accelerator.is_main_process:
        _write_validation(run_dir / files.VALIDATION, val_pairs, records)

    with torch.random.fork_rng():  # the initial weights depend on the seed alone, however the run started
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, ids.layout.vocab_size, len(tokenizer))
    grouped = LengthGroupedBatches(_token_lengths(train_pairs.texts, tokenizer, cfg), t.batch_size, cfg.seed)
    loader = DataLoader(list(range(len(train_pairs.texts))), batch_sampler=grouped,
                        collate_fn=lambda rows: _batch(rows, train_pairs, labels, tokenizer, cfg))
    if len(loader) == 0:
        raise CartError(f"{len(train_pairs.texts)} training pairs make no full batch of train.batch_size={t.batch_size}")
    trainable = [p for p in model.parameters() if p.requires_grad]  # a frozen encoder is not optimised
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    updates_per_epoch = len(loader) // t.gradient_accumulation
    total = max(1, updates_per_epoch * t.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(t.warmup_steps, total))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    settings = _resume_settings(cfg, inputs)
    trainer = {"settings": settings, "step": 0, "epoch": 0, "batches_done": 0, "best_r1": -1.0,
               "best_step": 0, "stale": 0, "history": []}
    if accelerator.is_main_process:  # what a killed save left behind
        files.remove_stale(run_dir, f".{files.MODEL}.*")
        files.remove_stale(run_dir / files.STATE, ".step_*")
    accelerator.wait_for_everyone()
    state = _latest_state(run_dir)
    if state is not None:
        saved = json.loads((state / "trainer.json").read_text(encoding="utf-8"))
        changed = _differences(saved.get("settings", {}), settings)
        if changed:
            raise CartError(f"{state} was saved by a run with other settings or inputs ({'; '.join(changed[:3])}): "
                            f"remove {run_dir / files.STATE} to start again, or choose another run name")
        accelerator.load_state(str(state))
        trainer = saved
        accelerator.print(f"train: resuming from {state} (epoch {trainer['epoch']}, step {trainer['step']})")
    if t.tracker != "none":
        accelerator.init_trackers("cart", config=_flat(to_dict(cfg)),
                                  init_kwargs={"wandb": {"name": cfg.run, "dir": str(run_dir)}} if t.tracker == "wandb" else {})

    accelerator.print(f"train: {len(train_pairs.texts)} training pairs, {len(val_pairs.texts)} validation pairs, "
                      f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                      f"{accelerator.num_processes} process(es), {updates_per_epoch} steps an epoch")
    bar = tqdm(total=total, initial=trainer["step"], desc="train", unit=" step", disable=not accelerator.is_main_process)
    seen, clock = 0, time.perf_counter()
    stop = trainer["stale"] >= t.patience > 0
    while trainer["epoch"] < t.epochs and not stop:
        loader.set_epoch(trainer["epoch"])
        grouped.set_epoch(trainer["epoch"])  # accelerate does not reach it once it wraps it for N processes
        batches = accelerator.skip_first_batches(loader, trainer["batches_done"]) if trainer["batches_done"] else loader
        model.train()
        for batch in batches:
            # dropout masks depend only on (seed, step, process): a resumed run draws the same ones
            torch.manual_seed(hash((cfg.seed, trainer["epoch"], trainer["batches_done"], accelerator.process_index)))
            with accelerator.accumulate(model):
                loss = cart_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], t.rdrop_weight)
                accelerator.backward(loss.total)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            trainer["batches_done"] += 1
            seen += len(batch["input_ids"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            trainer["step"] += 1
            bar.update(1)
            if trainer["step"] % t.log_every == 0:
                pairs_per_second = seen / (time.perf_counter() - clock)
                bar.set_postfix(loss=f"{loss.total.item():.3f}", pairs_s=f"{pairs_per_second:.0f}")
                accelerator.log({"loss": loss.total.item(), "cross_entropy": loss.cross_entropy.item(),
                                 "kl": loss.kl.item(), "learning_rate": scheduler.get_last_lr()[0],
                                 "pairs_per_second": pairs_per_second}, step=trainer["step"])
            if trainer["step"] % t.save_every == 0:
                _save_state(accelerator, run_dir, trainer, t.keep_states)
        trainer["epoch"] += 1
        trainer["batches_done"] = 0
        stop = _validate(accelerator, model, tokenizer, ids, val_pairs, train_pairs, relevant, cfg, trainer, inputs)
        _save_state(accelerator, run_dir, trainer, t.keep_states)
    bar.close()
    if trainer["best_step"] == 0:  # no validation happened (no epochs left): keep what we have
        _save_model(accelerator, model, tokenizer, cfg, inputs, trainer)
    accelerator.end_training()
    out = run_dir / files.MODEL
    if accelerator.is_main_process:
        summary = {"best_validation_r1": trainer["best_r1"], "best_step": trainer["best_step"],
                   "steps": trainer["step"], "epochs": trainer["epoch"], "history": trainer["history"],
                   "training_pairs": len(train_pairs.texts), "validation_pairs": len(val_pairs.texts)}
        files.write_text(run_dir / files.TRAIN_LOG, json.dumps(summary, indent=2) + "\n")
        print(f"train: best validation R@1 {trainer['best_r1']:.3f} at step {trainer['best_step']} -> {out}")
    return out


def load(run_dir: Path) -> tuple[CartT5, object, Identifiers]:
    """The trained model (eval mode), its tokenizer and the identifiers it emits; refuses a model trained
    on other identifiers or another corpus."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    _, manifest = files.verified_input(run_dir, files.MODEL_WEIGHTS)
    files.verify_companions(run_dir, manifest, "cart train")
    named = {Path(name).name for name in manifest.get("companions", {})} | {manifest["file"]}
    extra = [p.name for p in (run_dir / files.MODEL).iterdir() if p.name not in named | {files.manifest_path(p).name}]
    if extra:
        raise CartError(f"{run_dir / files.MODEL / extra[0]} is not one of the files the model was saved with: "
                        f"remove it, or rerun `cart train`")
    for name in (files.IDS, files.CORPUS):
        files.require_built_from(manifest, files.MODEL_WEIGHTS, run_dir, name)
    ids = build_ids.load(run_dir)
    model = CartT5.from_pretrained(run_dir / files.MODEL, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / files.MODEL, local_files_only=True)
    return model, tokenizer, ids


def split_pairs(records: list[dict], cfg: Config) -> tuple[Pairs, Pairs, dict[str, set[int]]]:
    """(text, item) training pairs from every training text, a validation split of them, and for every
    text the items having it as a training text (all are right answers, as in the benchmark's scoring).
    Validation pairs come only from items with 2+ distinct training texts, so every item keeps one."""
    t = cfg.train
    pairs, relevant = [], {}
    for row, record in enumerate(records):
        texts = list(dict.fromkeys(x["text"] for x in record["texts"] if x["kind"] in corpus.TRAINING_KINDS))
        pairs.extend((text, row, len(texts)) for text in texts)
        for text in texts:
            relevant.setdefault(text.lower(), set()).add(row)
    if not pairs:
        raise CartError(f"{cfg.run_dir / files.CORPUS}: no training texts (kinds {', '.join(corpus.TRAINING_KINDS)}): "
                        f"every text is a held-out query; nothing to train on")
    candidates = [i for i, (_, _, count) in enumerate(pairs) if count > 1]
    random.Random(cfg.seed).shuffle(candidates)
    chosen, per_item = set(), {}
    for i in candidates:
        if len(chosen) >= min(t.validation_max, round(t.validation_fraction * len(pairs))):
            break
        _, row, count = pairs[i]
        if per_item.get(row, 0) < count - 1:  # leave every item at least one training text
            per_item[row] = per_item.get(row, 0) + 1
            chosen.add(i)
    train = Pairs([p[0] for i, p in enumerate(pairs) if i not in chosen], [p[1] for i, p in enumerate(pairs) if i not in chosen])
    val = Pairs([pairs[i][0] for i in sorted(chosen)], [pairs[i][1] for i in sorted(chosen)])
    if t.subset_queries:
        by_item = {}
        for text, row in zip(train.texts, train.items):
            by_item.setdefault(row, []).append(text)
        rng = random.Random(f"{cfg.seed}/subsets")
        for row, texts in by_item.items():
            for text in subset_queries(texts, t.subset_queries, t.subset_size, rng):
                train.texts.append(text)
                train.items.append(row)
                relevant.setdefault(text.lower(), set()).add(row)
    return train, val, relevant


def subset_queries(texts: list[str], count: int, largest: int, rng: random.Random) -> list[str]:
    """Up to `count` distinct new queries, each 2..`largest` of an item's short training texts in random
    order, joined by spaces (tags -> "hands raising": the shape of a name). Short texts are those whose
    words do not include all the words of another of its texts (so a text joining the others is left out).
    Made from training texts only: never from validation or held-out queries."""
    words = [frozenset(text.lower().split()) for text in texts]
    short = [text for text, w in zip(texts, words) if not any(o < w for o in words)]
    if len(short) < 2:
        return []
    made, existing = [], {text.lower() for text in texts}
    for _ in range(4 * count):  # a few tries: small items have few distinct subsets
        chosen = rng.sample(short, rng.randint(2, min(largest, len(short))))
        query = " ".join(chosen)
        if query.lower() not in existing:
            existing.add(query.lower())
            made.append(query)
            if len(made) == count:
                break
    return made


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    m = cfg.model
    source = m.tokenizer or m.pretrained or "minilm"
    folder = minilm_dir() if source == "minilm" else Path(source).expanduser()
    if not folder.is_dir():
        raise CartError(f"model.tokenizer: folder not found: {folder}")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CartError(f"model.tokenizer: cannot load a tokenizer from {folder}: {str(e).splitlines()[0]}") from None


def build_model(cfg: Config, decoder_vocab_size: int, text_vocab_size: int) -> CartT5:
    m = cfg.model
    if m.pretrained:
        folder = Path(m.pretrained).expanduser()
        if not (folder / "config.json").exists():
            raise CartError(f"model.pretrained: no T5 config.json in {folder}")
        return CartT5.from_t5(folder, decoder_vocab_size=decoder_vocab_size, fusion=m.fusion, dropout=m.dropout)
    text_encoder = None
    if m.encoder == "minilm":  # the config checked d_model and the tokenizer
        text_encoder = json.loads((minilm_dir() / "config.json").read_text(encoding="utf-8"))
    config = cart_config(text_vocab_size=text_vocab_size, decoder_vocab_size=decoder_vocab_size, fusion=m.fusion,
                         text_encoder=text_encoder, freeze_encoder=m.freeze_encoder,
                         d_model=m.d_model, d_kv=m.d_model // m.num_heads, d_ff=m.d_ff, num_layers=m.num_layers,
                         num_decoder_layers=m.num_decoder_layers, num_heads=m.num_heads, dropout_rate=m.dropout)
    model = CartT5(config)
    if m.encoder == "minilm":  # the whole pretrained encoder, as sentence-transformers loads it
        weights = load_file(str(minilm_dir() / "model.safetensors"))
        missing, _ = model.encoder.bert.load_state_dict({k: v for k, v in weights.items() if not k.startswith("pooler")},
                                                        strict=False)
        if [k for k in missing if "position_ids" not in k]:
            raise CartError(f"MiniLM weights do not fit its BertModel: missing {missing[:3]}")
    elif m.init_embeddings == "minilm":
        if (m.tokenizer or "minilm") != "minilm":
            raise CartError("model.init_embeddings=minilm needs MiniLM's tokenizer (model.tokenizer=minilm)")
        model.get_input_embeddings().weight.data.copy_(minilm_word_embeddings(m.d_model))
    return model


def minilm_word_embeddings(dim: int) -> torch.Tensor:
    """MiniLM's word embeddings (30522 x 384), projected on their top `dim` principal directions when dim
    differs, rescaled to T5's embedding scale (unit RMS per row on average)."""
    weights = load_file(str(minilm_dir() / "model.safetensors"))["embeddings.word_embeddings.weight"].float()
    if dim != MINILM_DIM:
        centred = weights - weights.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        weights = centred @ v[:dim].T if dim <= MINILM_DIM else torch.cat(
            [weights, torch.zeros(len(weights), dim - MINILM_DIM)], dim=1)
    return weights / weights.pow(2).mean().sqrt()


def read_inputs(run_dir: Path) -> tuple[list[dict], Identifiers, dict[str, str]]:
    """The corpus (with generated captions merged in), the identifiers, and their hashes; refuses
    identifiers that were not built from this corpus."""
    records = corpus.read(run_dir)
    ids = build_ids.load(run_dir)
    _, embed_manifest = files.verified_input(run_dir, files.EMBEDDINGS)
    files.require_built_from(embed_manifest, files.EMBEDDINGS, run_dir, files.CORPUS)
    if len(ids.codes) != len(records):
        raise CartError(f"{run_dir / files.IDS} has {len(ids.codes)} identifiers for {len(records)} corpus items: "
                        f"rerun `cart embed` and `cart ids`")
    inputs = {name: files.verified_input(run_dir, name)[1]["sha256"] for name in (files.CORPUS, files.IDS)}
    records, captions_sha = with_generated_captions(run_dir, records)
    if captions_sha:
        inputs[files.CAPTIONS] = captions_sha
    return records, ids, inputs


def with_generated_captions(run_dir: Path, records: list[dict]) -> tuple[list[dict], str | None]:
    """The records with `cart caption`'s captions added as texts of kind `generated` (new dicts), and the
    sha256 of captions.jsonl; unchanged records and None when it has not run. Refuses captions of
    another corpus."""
    if not (Path(run_dir) / files.CAPTIONS).exists():
        return records, None
    path, manifest = files.verified_input(run_dir, files.CAPTIONS)
    files.require_built_from(manifest, files.CAPTIONS, run_dir, files.CORPUS)
    with open(path, encoding="utf-8") as f:
        generated = {row["id"]: row["captions"] for row in map(json.loads, f)}
    return [{**r, "texts": r["texts"] + [{"text": c, "kind": "generated"} for c in generated.get(r["id"], [])]}
            for r in records], manifest["sha256"]


def _token_lengths(texts: list[str], tokenizer, cfg: Config) -> list[int]:
    encoded = tokenizer(texts, truncation=True, max_length=cfg.model.max_query_tokens)
    return [len(ids) for ids in encoded["input_ids"]]


def _batch(rows: list[int], pairs: Pairs, labels: torch.Tensor, tokenizer, cfg: Config) -> dict:
    encoded = tokenizer([pairs.texts[i] for i in rows], padding=True, truncation=True,
                        max_length=cfg.model.max_query_tokens, return_tensors="pt")
    targets = labels[[pairs.items[i] for i in rows]]
    eos = torch.full((len(rows), 1), build_ids.TokenLayout.EOS, dtype=targets.dtype)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.cat([targets, eos], dim=1)}


def recall_at_1(model, tokenizer, ids: Identifiers, texts: list[str], relevant: list[set[int]], cfg: Config,
                device: torch.device, batch_size: int = 64) -> tuple[int, int]:
    """(hits, count): how many texts' top-1 constrained beam-search item is one of their relevant items."""
    hits = 0
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of like length pad less
    for start in range(0, len(texts), batch_size):
        rows = order[start: start + batch_size]
        encoded = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                            max_length=cfg.model.max_query_tokens, return_tensors="pt").to(device)
        items, _ = decode(model, encoded["input_ids"], encoded["attention_mask"], ids.trie,
                          beams=cfg.retrieve.beam_width, top_k=1)
        hits += sum(int(item) in relevant[i] for item, i in zip(items[:, 0].tolist(), rows))
    return hits, len(texts)


def _validate(accelerator, model, tokenizer, ids, val_pairs, train_pairs, relevant, cfg, trainer, inputs) -> bool:
    """Validation R@1 (and R@1 on as many training pairs) after an epoch; keeps the best model in
    `model/`; returns True when training should stop early."""
    t = cfg.train
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    figures = {"epoch": trainer["epoch"], "step": trainer["step"]}
    sample = random.Random(cfg.seed).sample(range(len(train_pairs.texts)), min(len(train_pairs.texts), max(len(val_pairs.texts), 1)))
    for name, texts in (("validation_r1", val_pairs.texts), ("train_r1", [train_pairs.texts[i] for i in sample])):
        mine = list(range(accelerator.process_index, len(texts), accelerator.num_processes))
        hits, count = recall_at_1(unwrapped, tokenizer, ids, [texts[i] for i in mine],
                                  [relevant[texts[i].lower()] for i in mine], cfg, accelerator.device)
        totals = accelerator.reduce(torch.tensor([hits, count], device=accelerator.device), reduction="sum")
        figures[name] = totals[0].item() / max(totals[1].item(), 1)
    unwrapped.train()
    trainer["history"].append(figures)
    accelerator.log({k: v for k, v in figures.items() if k.endswith("r1")}, step=trainer["step"])
    accelerator.print(f"train: epoch {trainer['epoch']} step {trainer['step']}: validation R@1 "
                      f"{figures['validation_r1']:.3f}, training-query R@1 {figures['train_r1']:.3f}")
    if not val_pairs.texts:  # nothing to validate on: the last epoch's model is the model
        trainer["best_step"] = trainer["step"]
        _save_model(accelerator, model, tokenizer, cfg, inputs, trainer)
        return False
    if figures["validation_r1"] > trainer["best_r1"]:
        trainer.update(best_r1=figures["validation_r1"], best_step=trainer["step"], stale=0)
        _save_model(accelerator, model, tokenizer, cfg, inputs, trainer)
    else:
        trainer["stale"] += 1
    return trainer["stale"] >= t.patience > 0


def _save_model(accelerator, model, tokenizer, cfg: Config, inputs: dict, trainer: dict) -> None:
    """Write the model, its tokenizer and its manifest (which hashes every file of the folder) under a
    temporary name, then publish them as `model/` in one step: a model always exists, old or new."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = cfg.run_dir / files.MODEL
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = Path(files.MODEL_WEIGHTS).name
        files.write_manifest(tmp / weights, "train", to_dict(cfg), inputs, step=trainer["step"],
                             validation_r1=trainer["best_r1"],
                             companions=files.folder_hashes(tmp, files.MODEL, leave_out=(weights,)))
        files.publish_folder(tmp, out)
    accelerator.wait_for_everyone()


def _save_state(accelerator, run_dir: Path, trainer: dict, keep: int) -> None:
    """Every process saves into a temporary folder, then the first publishes it as state/step_N: a folder
    named step_N is complete."""
    states = run_dir / files.STATE
    tmp = states / f".step_{trainer['step']}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        files.write_text(tmp / "trainer.json", json.dumps(trainer, indent=2) + "\n")
        files.publish_folder(tmp, states / f"step_{trainer['step']}")
        for old in _states(run_dir)[: -max(1, keep)]:
            files.remove_folder(old)
    accelerator.wait_for_everyone()


def _states(run_dir: Path) -> list[Path]:
    """Complete state folders, oldest first."""
    folders = [p for p in (run_dir / files.STATE).glob("step_*") if (p / "trainer.json").exists()]
    return sorted(folders, key=lambda p: int(p.name.split("_")[1]))


def _latest_state(run_dir: Path) -> Path | None:
    states = _states(run_dir)
    return states[-1] if states else None


def _resume_settings(cfg: Config, inputs: dict) -> dict:
    """What a state must share with this run to be resumed: the inputs and every setting that changes the
    weights (not the epoch count, patience, tracker, save/log frequencies, or validation's beam width)."""
    settings = to_dict(cfg)
    train = {k: v for k, v in settings["train"].items()
             if k not in ("epochs", "patience", "tracker", "save_every", "keep_states", "log_every")}
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


def _schedule(warmup: int, total: int):
    """Linear warm-up, then cosine decay to zero at the last planned step."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
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


def _write_validation(path: Path, pairs: Pairs, records: list[dict]) -> None:
    lines = [json.dumps({"text": text, "id": records[item]["id"]}, ensure_ascii=False) + "\n"
             for text, item in zip(pairs.texts, pairs.items)]
    files.write_text(path, "".join(lines))
