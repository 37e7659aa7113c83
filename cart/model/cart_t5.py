"""CART's model: a T5 encoder-decoder whose decoder reads every encoder layer through coarse + fine fusion
(`cart.model.fusion`), mapping a query text to its item's identifier tokens.

Packing the memory into the encoder output keeps `generate` unaware of fusion, but for one thing: beam
search keeps one memory a query (`_expand_inputs_for_generation`), and a query's beams read it side by side,
as several training passes do; the decoder's self-attention uses transformers' KV cache as usual. The fused
attentions keep their own keys and values of the memory during a `generate` call (`_keys_values`): projected
once a query, not once a beam and a step.

The decoder's vocabulary is the identifier tokens of the ids stage only (its own embedding and output
layer); the encoder keeps the text vocabulary. `config.cart_fusion = False` is the paper's
"w/o fusion": plain T5 cross-attention to the last encoder layer.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration, T5PreTrainedModel
from transformers.cache_utils import EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.models.t5.modeling_t5 import T5Attention, T5DenseActDense, T5DenseGatedActDense, T5Stack

from cart.index.vocab import TokenLayout
from cart.model.fusion import BertFusionEncoder, FusedCrossAttention, FusedMemory, LayerFusionEncoder


def cart_config(*, text_vocab_size: int, level_sizes: list[int], fusion: bool, fine_fusion: bool = True,
                level_softmax: bool = False, geometry_dim: int = 0, geometry_scale: float = 20.0,
                base: T5Config | None = None, text_encoder: dict | None = None, freeze_encoder: bool = False,
                tune_layers: int = 0, **sizes) -> T5Config:
    """A T5 config for CartT5: `base` (a pretrained T5's) or T5's defaults, with `sizes` (d_model,
    num_layers, ...) applied and the identifier decoder's vocabulary (`level_sizes`, the TokenLayout's) and
    special tokens set. `fine_fusion`: the per-layer attention beside the coarse one (else coarse only);
    `level_softmax`: each decoding position's softmax ranges over its level's tokens only. `geometry_dim`:
    the width of the identifier space (the embeddings `cart ids` quantised) for the identifier geometry
    (`CartT5._geometry_logits`), 0 for none; `geometry_scale` its initial scale. `text_encoder`: a BERT config
    (as a dict) whose model replaces T5's encoder (`BertFusionEncoder`); `freeze_encoder` keeps it fixed but
    for its top `tune_layers` layers, which training may fine-tune after a frozen warm-up."""
    config = copy.deepcopy(base) if base is not None else T5Config()
    for key, value in sizes.items():
        setattr(config, key, value)
    config.vocab_size = text_vocab_size
    config.decoder_vocab_size = TokenLayout(level_sizes).vocab_size
    config.cart_level_sizes = list(level_sizes)
    config.cart_level_softmax = level_softmax
    config.cart_fusion = fusion
    config.cart_fine_fusion = fusion and fine_fusion
    config.cart_geometry_dim = geometry_dim
    config.cart_geometry_scale = geometry_scale
    config.cart_text_encoder = text_encoder
    config.cart_freeze_encoder = freeze_encoder
    config.cart_tune_layers = tune_layers
    if text_encoder is not None:
        if text_encoder["hidden_size"] != config.d_model:
            raise ValueError(f"d_model={config.d_model} must equal the text encoder's width {text_encoder['hidden_size']}")
        config.num_layers = text_encoder["num_hidden_layers"]  # S, the fusion's sources
    config.tie_word_embeddings = False  # the decoder has its own (identifier) vocabulary
    config.scale_decoder_outputs = False  # T5 scales only when the output layer is tied to the embeddings
    config.pad_token_id = config.decoder_start_token_id = TokenLayout.PAD
    config.eos_token_id = TokenLayout.EOS
    config.is_encoder_decoder = True
    return config


def _with_defaults(config: T5Config) -> None:
    """Models saved before a switch existed load as they were trained: without it."""
    defaults = {"cart_fine_fusion": config.cart_fusion, "cart_level_softmax": False, "cart_level_sizes": [],
                "cart_geometry_dim": 0, "cart_geometry_scale": 20.0, "cart_tune_layers": 0}
    for key, value in defaults.items():
        if not hasattr(config, key):
            setattr(config, key, value)


class CartT5(T5PreTrainedModel, GenerationMixin):
    """Query text -> identifier tokens. forward(input_ids, attention_mask, labels) -> (loss, logits)."""

    _keys_to_ignore_on_load_unexpected = ["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"]
    _tied_weights_keys = {}

    def __init__(self, config: T5Config):
        super().__init__(config)
        _with_defaults(config)
        encoder_config = copy.deepcopy(config)
        encoder_config.is_decoder, encoder_config.use_cache = False, False
        self.encoder = (BertFusionEncoder(encoder_config) if getattr(config, "cart_text_encoder", None)
                        else LayerFusionEncoder(encoder_config))
        decoder_config = copy.deepcopy(config)
        decoder_config.is_decoder = True
        decoder_config.num_layers = config.num_decoder_layers
        decoder_config.vocab_size = config.decoder_vocab_size
        self.decoder = T5Stack(decoder_config)
        if config.cart_fusion:
            for i, block in enumerate(self.decoder.block):
                block.layer[1] = FusedCrossAttention(config, layer_idx=i)
        self.lm_head = nn.Linear(config.d_model, config.decoder_vocab_size, bias=False)
        if config.cart_geometry_dim:  # see _geometry_logits
            self.geometry = nn.Parameter(torch.zeros(config.decoder_vocab_size, config.cart_geometry_dim))
            self.geometry_scale = nn.Parameter(torch.tensor(float(config.cart_geometry_scale)))
            self.geometry_query = (nn.Identity() if config.cart_geometry_dim == config.d_model
                                   else nn.Linear(config.d_model, config.cart_geometry_dim, bias=False))
        self.layout = TokenLayout(config.cart_level_sizes)  # the identifier tokens' levels (the level softmax)
        self._level_tokens = None  # see _restrict_to_levels
        self.post_init()
        self._init_cart_layers()

    @torch.no_grad()
    def _init_cart_layers(self):
        """T5's rules for every T5 layer (transformers' initialisation skips the encoder subclass and the
        layers swapped in), fan-in scaling for our own layers (T5 draws an untied output layer with std 1)."""
        for module in self.modules():
            if isinstance(module, (T5Attention, T5DenseActDense, T5DenseGatedActDense)):
                self._init_weights(module)
            if isinstance(module, nn.Linear) and module in (self.lm_head, getattr(self.encoder, "coarse_projection", None),
                                                            *(getattr(b.layer[1], "gate", None) for b in self.decoder.block)):
                module.weight.normal_(std=module.in_features ** -0.5)
                if module.bias is not None:
                    module.bias.zero_()

    @property
    def sources(self) -> int:
        """S, the encoder layers in the memory beside Z (fine fusion); 0 for coarse fusion or none."""
        return self.config.num_layers if self.config.cart_fine_fusion else 0

    def _geometry_logits(self, pooled: torch.Tensor, rows: int, tokens: slice = slice(None)) -> torch.Tensor:
        """scale * <q, e_t> for every identifier token t: q is the query's sentence embedding (its encoder's
        mean-pooled last layer, normalised; projected when the identifier space is another), e_t starts as
        the mean residual of the items having t at its level (`identifiers.residual_means`). With the
        level softmax an identifier's score then starts as scale * <q, x_hat> minus a constant per query,
        x_hat the item's embedding rebuilt from its tokens: a query starts near its dense answer, and the
        decoder learns from there. (rows, V) or (rows, the `tokens`): an example's row repeated for its
        passes or beams."""
        q = nn.functional.normalize(self.geometry_query(pooled), dim=-1)
        q = q.repeat_interleave(rows // len(q), dim=0)
        return self.geometry_scale * q @ self.geometry[tokens].T

    def _level_slice(self, position: int) -> slice:
        """The tokens decoding position `position` may emit: its level's (EOS alone after the last level)."""
        if position < self.layout.length:
            return slice(*self.layout.level_range(position))
        return slice(TokenLayout.EOS, TokenLayout.EOS + 1)

    def _level_scores(self, hidden: torch.Tensor, pooled: torch.Tensor | None, position: int) -> torch.Tensor:
        """The level softmax's logits of one decoding position over its level's tokens alone (EOS after the
        last level): hidden (rows, d) -> (rows, V_l). The output layer computes the level's rows only, not
        the whole vocabulary (a third of it at three equal levels)."""
        level = self._level_slice(position)
        scores = nn.functional.linear(hidden, self.lm_head.weight[level])
        if self.config.cart_geometry_dim:
            scores = scores + self._geometry_logits(pooled, len(hidden), level)
        return scores

    def _one_level_logits(self, hidden: torch.Tensor, pooled: torch.Tensor | None, position: int) -> torch.Tensor:
        """`_level_scores` of one decoding position (B, 1, d) spread over the whole vocabulary (B, 1, V), the
        other tokens at `_restrict_to_levels`' mask value: what `generate` expects."""
        logits = hidden.new_full((*hidden.shape[:2], self.layout.vocab_size), torch.finfo(hidden.dtype).min)
        logits[:, 0, self._level_slice(position)] = self._level_scores(hidden[:, 0], pooled, position)
        return logits

    def level_log_probs(self, tokens: torch.Tensor, memory: FusedMemory, attention_mask: torch.Tensor | None,
                        cache: EncoderDecoderCache) -> torch.Tensor:
        """One decoding step of a level-softmax model, for a beam search of our own (`decoding.decode`):
        tokens (rows, 1), each row's latest token (the start token first), `cache` holding the rows' earlier
        steps -> (rows, V_l) log-probabilities over the codes of level l, l the cache's length. With fusion a
        query's rows are consecutive, as many for each query, and read its one memory side by side; without
        it, memory and mask come a row each."""
        if not self.config.cart_level_softmax:
            raise ValueError("level_log_probs needs a model trained with the level softmax")
        position = cache.get_seq_length()
        hidden = self.decoder(input_ids=tokens, encoder_hidden_states=memory.last_hidden_state,
                              encoder_attention_mask=self._memory_mask(attention_mask), cache=cache,
                              use_cache=True).last_hidden_state
        return self._level_scores(hidden[:, -1], memory.pooled, position).log_softmax(-1)

    def _memory_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The text's mask repeated over the memory's S + 1 parts (one without fine fusion)."""
        return attention_mask.repeat(1, self.sources + 1) if attention_mask is not None else None

    def _restrict_to_levels(self, logits: torch.Tensor, start: int) -> torch.Tensor:
        """Position l may emit only level l's tokens (the last position only EOS): the softmax spends no
        probability on tokens that can never follow, in training as in decoding. Masked with the dtype's
        lowest finite value rather than -inf, so R-Drop's KL between two passes stays finite."""
        if self._level_tokens is None or self._level_tokens.device != logits.device:
            # level_tokens[l, t]: token t is of identifier level l (the last row: EOS alone). Built from the
            # config, not kept as a buffer: from_pretrained does not fill buffers that are not saved
            layout = self.layout
            level_tokens = torch.zeros(layout.length + 1, layout.vocab_size, dtype=torch.bool)
            for level in range(layout.length):
                level_tokens[level, slice(*layout.level_range(level))] = True
            level_tokens[layout.length, TokenLayout.EOS] = True
            self._level_tokens = level_tokens.to(logits.device)
        positions = torch.arange(start, start + logits.shape[1], device=logits.device)
        allowed = self._level_tokens[positions.clamp(max=len(self._level_tokens) - 1)]  # (L', V)
        return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)

    def get_input_embeddings(self):
        if isinstance(self.encoder, BertFusionEncoder):
            return self.encoder.bert.embeddings.word_embeddings
        return self.encoder.embed_tokens

    def set_input_embeddings(self, embeddings):
        if isinstance(self.encoder, BertFusionEncoder):
            self.encoder.bert.embeddings.word_embeddings = embeddings
        else:
            self.encoder.embed_tokens = embeddings

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids=None, **model_kwargs):
        """With fusion, beam search keeps one memory (and its mask) a query instead of a copy a beam: a
        query's beams, rows b * beams + j, read it side by side (FusedCrossAttention), so its keys and values
        are projected once a query."""
        if not self.config.cart_fusion or "encoder_outputs" not in model_kwargs:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        kept = {key: model_kwargs.pop(key) for key in ("encoder_outputs", "attention_mask") if key in model_kwargs}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, False, input_ids, **model_kwargs)
        return input_ids, model_kwargs | kept

    def _first_step_beams(self, decoder_input_ids, memory: torch.Tensor, start: int, cache) -> int:
        """Beam search's first step reads each query's memory with `beams` rows that all hold the start token
        alone (`_expand_inputs_for_generation` keeps one memory a query): they would compute the same thing
        `beams` times. -> beams when that is so, else 1 (training, later steps, plain cross-attention)."""
        if (cache is None or start != 0 or decoder_input_ids is None or decoder_input_ids.shape[1] != 1
                or len(decoder_input_ids) <= len(memory) or torch.is_grad_enabled()):
            return 1
        beams = len(decoder_input_ids) // len(memory)
        rows = decoder_input_ids.view(len(memory), beams)
        return beams if bool((rows == rows[:, :1]).all()) else 1

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, labels=None, use_cache=None, passes: int = 1,
                encoder_layers=None, **kwargs) -> Seq2SeqLMOutput:
        """passes > 1: the decoder runs `passes` times over each example's memory, on `labels` (B * passes, L),
        example b's passes in rows b * passes + p (R-Drop: the same labels twice, two dropout draws; the ranking
        loss: the right identifiers, then each negative). A frozen encoder has no dropout, so it runs once;
        fusion then reads the one memory side by side, plain cross-attention gets it copied.
        `encoder_layers` (B, T, S, d): a frozen encoder's layer outputs, computed beforehand."""
        kwargs.pop("return_dict", None)
        kwargs.pop("past_key_values", None)
        if encoder_outputs is None:
            frozen = getattr(self.encoder, "frozen", False)
            if passes > 1 and not frozen:
                input_ids = input_ids.repeat_interleave(passes, dim=0)
                attention_mask = attention_mask.repeat_interleave(passes, dim=0)
            layers = {"layers": encoder_layers} if encoder_layers is not None else {}
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **layers)
            if passes > 1 and frozen and not self.config.cart_fusion:  # fusion reads one memory side by side
                encoder_outputs = FusedMemory(last_hidden_state=encoder_outputs[0].repeat_interleave(passes, 0),
                                              pooled=encoder_outputs.pooled)
                attention_mask = attention_mask.repeat_interleave(passes, 0)
        memory = encoder_outputs[0]  # (B, (S + 1) T, d) with fusion, else (B, T, d)
        memory_mask = self._memory_mask(attention_mask)
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = self._shift_right(labels)
        start = cache.get_seq_length() if cache is not None else 0  # the first position decoded now
        beams = self._first_step_beams(decoder_input_ids, memory, start, cache)
        if beams > 1:  # one row a query, then its output and cache copied to the query's beams
            decoder_input_ids = decoder_input_ids[::beams]
            decoder_attention_mask = None if decoder_attention_mask is None else decoder_attention_mask[::beams]
        decoded = self.decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                               encoder_hidden_states=memory, encoder_attention_mask=memory_mask,
                               cache=cache, use_cache=use_cache, **kwargs)
        hidden = decoded.last_hidden_state
        if beams > 1:
            hidden = hidden.repeat_interleave(beams, dim=0)
            decoded.cache.batch_repeat_interleave(beams)
        if self.config.cart_level_softmax and hidden.shape[1] == 1:  # a decoding step
            logits = self._one_level_logits(hidden, getattr(encoder_outputs, "pooled", None), start)
        else:
            logits = self.lm_head(hidden)  # (B, L, decoder vocab)
            if self.config.cart_geometry_dim:
                logits = logits + self._geometry_logits(encoder_outputs.pooled, len(logits)).unsqueeze(1)
            if self.config.cart_level_softmax:
                logits = self._restrict_to_levels(logits, start)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, cache=decoded.cache,
                               encoder_last_hidden_state=memory)

    @classmethod
    def from_t5(cls, folder: str | Path, *, level_sizes: list[int], fusion: bool, dropout: float,
                **options) -> "CartT5":
        """A CartT5 starting from a pretrained T5 in a local folder: its encoder, its decoder's layers;
        new identifier embeddings, output layer and fusion weights. `options`: cart_config's."""
        t5 = T5ForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        config = cart_config(text_vocab_size=t5.config.vocab_size, level_sizes=level_sizes, fusion=fusion,
                             base=t5.config, dropout_rate=dropout, **options)
        model = cls(config)
        weights = {k: v for k, v in t5.state_dict().items()
                   if not k.startswith(("decoder.embed_tokens", "lm_head", "shared"))}
        weights["encoder.embed_tokens.weight"] = t5.shared.weight
        if fusion:  # the pretrained cross-attention starts the fused attentions
            for key in [k for k in weights if ".layer.1.EncDecAttention." in k]:
                value = weights.pop(key)
                for part in ("coarse", "fine") if config.cart_fine_fusion else ("coarse",):
                    weights[key.replace("EncDecAttention", part)] = value
        missing, unexpected = model.load_state_dict(weights, strict=False)
        unexpected = [k for k in unexpected if "relative_attention_bias" not in k]
        if unexpected:
            raise ValueError(f"{folder}: unexpected T5 weights {unexpected[:3]}")
        return model
