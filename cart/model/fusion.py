"""CART's coarse + fine fusion: the decoder reads every encoder layer.

The encoder (T5's, or a pretrained BERT-style text encoder, `BertFusionEncoder`: all-MiniLM-L6-v2 offline)
hands the decoder, instead of its last layer alone, one memory built from all S layer outputs E1..ES (each
normalised: T5's with its final norm, which T5 itself applies only to the last; BERT's are post-norm):

    memory = [Z; E1; ...; ES]  (B, (S + 1) T, d),   Z = W [E1 ... ES] + b   (features concatenated)

Each decoder layer's cross-attention is replaced by `FusedCrossAttention`:

    coarse = CrossAttn_c(h, Z);  coarse = coarse * sigmoid(W_g coarse)   (self-gated)
    fine   = sum_i softmax(alpha)_i CrossAttn_f(h, E_i)                  (one attention, weights shared
                                                                          over layers; ours)
    h      = h + dropout(coarse + fine)

The fused attentions keep their own keys and values of the memory during a `generate` call (`_keys_values`):
projected once a query, not once a beam and a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import T5Config
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm, T5Stack, eager_attention_forward


@dataclass
class FusedMemory(BaseModelOutput):
    """The encoder's output: the memory the decoder reads (`last_hidden_state`) and the mean of the last
    layer over the text's tokens (`pooled`, (B, d): the sentence embedding, for the identifier geometry)."""

    pooled: torch.FloatTensor | None = None


def fused_memory(layers: list[torch.Tensor], projection: nn.Linear | None, mask: torch.Tensor | None,
                 fine: bool = True) -> FusedMemory:
    """[Z; E1; ...; ES] from the S normalised layer outputs (B, T, d) when fusion is on (a projection is
    given; [Z] alone without fine fusion), else the last layer."""
    weights = torch.ones(layers[-1].shape[:2], device=layers[-1].device) if mask is None else mask.to(layers[-1].dtype)
    pooled = (layers[-1] * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)  # (B, d)
    if projection is None:
        return FusedMemory(last_hidden_state=layers[-1], pooled=pooled)
    coarse = projection(torch.cat(layers, dim=-1))  # (B, T, d)
    if not fine:
        return FusedMemory(last_hidden_state=coarse, pooled=pooled)
    return FusedMemory(last_hidden_state=torch.cat([coarse, *layers], dim=1), pooled=pooled)  # (B, (S + 1) T, d)


class LayerFusionEncoder(T5Stack):
    """T5's encoder returning the fused memory [Z; E1; ...; ES] (fusion on) or its last layer (off)."""

    def __init__(self, config: T5Config):
        super().__init__(config)
        if config.cart_fusion:
            self.coarse_projection = nn.Linear(config.num_layers * config.d_model, config.d_model)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              output_hidden_states=self.config.cart_fusion, return_dict=True, **kwargs)
        if not self.config.cart_fusion:
            return fused_memory([out.last_hidden_state], None, attention_mask)
        # hidden_states = (embeddings, E1, ..., ES-1 raw, ES normalised): normalise the inner layers too
        layers = [self.final_layer_norm(h) for h in out.hidden_states[1:-1]] + [out.last_hidden_state]
        return fused_memory(layers, self.coarse_projection, attention_mask, self.config.cart_fine_fusion)


class BertFusionEncoder(nn.Module):
    """A pretrained BERT-style text encoder (all-MiniLM-L6-v2 from its PyPI package) in place of T5's: its
    S layer outputs, each already normalised by BERT's post-layer norm, make the same fused memory.
    Frozen (`cart_freeze_encoder`), it runs without gradients and without dropout, and its layer outputs may
    come precomputed (`layers`: training computes them once per text, `batches.LayerCache`). Its top
    `cart_tune_layers` layers may still be fine-tuned once training sets `tuning`: they then run again, with
    gradients and dropout, from the (cached) output of the frozen layer below them."""

    main_input_name = "input_ids"  # generate asks the encoder what it reads

    def __init__(self, config: T5Config):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(**config.cart_text_encoder), add_pooling_layer=False)
        self.frozen = config.cart_freeze_encoder
        self.tuned = config.cart_tune_layers if self.frozen else 0
        if self.tuned >= len(self.bert.encoder.layer):
            raise ValueError(f"{self.tuned} tuned layers of {len(self.bert.encoder.layer)}: leave one frozen below them")
        self.tuning = False  # set by training once its frozen warm-up is over
        self.bert.requires_grad_(not self.frozen)
        for layer in self._tuned_layers():
            layer.requires_grad_(True)
        if self.frozen:
            self.bert.eval()  # from the start: a module is built in training mode, dropout on
        self.coarse_projection = (nn.Linear(config.num_layers * config.d_model, config.d_model)
                                  if config.cart_fusion else None)
        self.fine = config.cart_fine_fusion

    def _tuned_layers(self) -> list[nn.Module]:
        return list(self.bert.encoder.layer)[len(self.bert.encoder.layer) - self.tuned:] if self.tuned else []

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.bert.eval()  # no dropout in a frozen encoder, whatever the model's mode
            for layer in self._tuned_layers():
                layer.train(mode and self.tuning)
        return self

    def layer_outputs(self, input_ids, attention_mask) -> torch.Tensor:
        """The S layer outputs, (B, T, S, d)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                            return_dict=True)
        layers = torch.stack(out.hidden_states[1:], dim=2)
        return self._retune(layers, attention_mask) if self.tuning else layers

    def _retune(self, layers: torch.Tensor, attention_mask) -> torch.Tensor:
        """The layer outputs with the tuned top layers run again, with gradients, from the frozen one below."""
        from transformers.masking_utils import create_bidirectional_mask

        hidden = layers[:, :, -self.tuned - 1]
        mask = create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask)
        tuned = []
        for layer in self._tuned_layers():
            hidden = layer(hidden, attention_mask=mask)
            tuned.append(hidden)
        return torch.cat([layers[:, :, : -self.tuned], torch.stack(tuned, dim=2)], dim=2)

    def forward(self, input_ids=None, attention_mask=None, layers=None, **kwargs):
        if layers is None:
            layers = self.layer_outputs(input_ids, attention_mask)  # (B, T, S, d)
        elif self.tuning:
            layers = self._retune(layers, attention_mask)
        return fused_memory(list(layers.unbind(2)), self.coarse_projection, attention_mask, self.fine)


class FusedCrossAttention(nn.Module):
    """Drop-in for T5LayerCrossAttention reading the fused memory: gated coarse + alpha-mixed fine."""

    def __init__(self, config: T5Config, layer_idx: int):
        super().__init__()
        self.sources = config.num_layers if config.cart_fine_fusion else 0  # S encoder layers in the memory
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.coarse = T5Attention(config, has_relative_attention_bias=False, layer_idx=layer_idx)
        self.gate = nn.Linear(config.d_model, config.d_model)
        if self.sources:
            self.fine = T5Attention(config, has_relative_attention_bias=False, layer_idx=layer_idx)
            self.alpha = nn.Parameter(torch.zeros(self.sources))  # softmax(alpha) mixes the S layers
        self.dropout = nn.Dropout(config.dropout_rate)
        self._memo = None  # (memory, its keys and values), see _keys_values

    def forward(self, hidden_states, key_value_states, attention_mask=None, **kwargs):
        """h + dropout(gated coarse + fine), as the module docstring writes it. Several decoder rows may read
        one memory (R-Drop's two passes, the ranking loss's negatives, beam search's beams): an example's
        rows come consecutive (row b * passes + p) and are read side by side, as more queries of its memory,
        so the memory's keys and values are computed once an example."""
        passes = hidden_states.shape[0] // key_value_states.shape[0]
        normed = self.layer_norm(hidden_states).reshape(key_value_states.shape[0], -1, hidden_states.shape[-1])
        if passes > 1 and attention_mask is not None:
            attention_mask = attention_mask[..., :1, :]  # one memory mask, the same for every query
        length = key_value_states.shape[1] // (self.sources + 1)  # T, the text's length
        coarse_mask, fine_mask = (None, None) if attention_mask is None else (attention_mask[..., :length],
                                                                              attention_mask[..., length:])
        coarse_kv, fine_kv = self._keys_values(key_value_states, length)
        coarse = self.coarse.o(_attend(self.coarse, _queries(self.coarse, normed), *coarse_kv, coarse_mask))
        fused = coarse * torch.sigmoid(self.gate(coarse))
        if self.sources:
            fused = fused + self._fine(normed, fine_kv, fine_mask)
        return hidden_states + self.dropout(fused.reshape(hidden_states.shape)), None, None

    def _fine(self, normed: torch.Tensor, keys_values, mask) -> torch.Tensor:
        """sum_i softmax(alpha)_i CrossAttn_f(h, E_i), with one attention's weights shared by the S layers:
        one product of the queries with the keys of all S layers, a softmax within each layer's T keys, the
        layers' weights folded into the probabilities, one product with the values, one output projection
        (it is linear). As S x heads separate attentions of a few keys each, the calls cost more than their
        arithmetic."""
        keys, values = keys_values  # (B, heads, S * T, d_kv) each
        scores = _queries(self.fine, normed) @ keys.transpose(-1, -2) * self.fine.scaling  # (B, heads, q, S * T)
        if mask is not None:  # the attention functions' mask: True to keep (sdpa) or added (eager)
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
                else scores + mask
        weights = torch.softmax(self.alpha, dim=0).to(scores.dtype).unsqueeze(-1)  # (S, 1)
        probabilities = scores.unflatten(-1, (self.sources, -1)).softmax(-1).mul(weights).flatten(-2)
        probabilities = nn.functional.dropout(probabilities, self.fine.dropout, self.training)
        out = probabilities @ values  # (B, heads, q, d_kv)
        return self.fine.o(out.transpose(1, 2).flatten(-2))

    def _keys_values(self, memory: torch.Tensor, length: int):
        """Keys and values of the coarse attention (over Z) and the fine one (over E1..ES, S * T positions).
        Without gradients they are kept for the memory they came from: `generate` hands the same memory
        tensor to every decoding step, so beam search projects it once instead of once a step."""
        if not torch.is_grad_enabled() and self._memo is not None and self._memo[0] is memory:
            return self._memo[1]
        projected = (_project(self.coarse, memory[:, :length]),
                     _project(self.fine, memory[:, length:]) if self.sources else (None, None))
        self._memo = None if torch.is_grad_enabled() else (memory, projected)
        return projected


def _project(attention: T5Attention, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T5Attention's keys and values of `states` (B, K, d), as (B, heads, K, d_kv) each."""
    shape = (*states.shape[:-1], -1, attention.key_value_proj_dim)
    return attention.k(states).view(shape).transpose(1, 2), attention.v(states).view(shape).transpose(1, 2)


def _queries(attention: T5Attention, states: torch.Tensor) -> torch.Tensor:
    """T5Attention's queries of `states` (B, q, d), as (B, heads, q, d_kv)."""
    return attention.q(states).view(*states.shape[:-1], -1, attention.key_value_proj_dim).transpose(1, 2)


def _attend(attention: T5Attention, queries, keys, values, mask) -> torch.Tensor:
    """T5Attention's cross-attention (no position bias) of projected queries over projected keys and values,
    before its output projection: (B, q, heads * d_kv)."""
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    out, _ = interface(attention, queries, keys, values, mask, scaling=attention.scaling,
                       dropout=attention.dropout if attention.training else 0.0)
    return out.flatten(-2)  # (B, q, heads, d_kv) -> (B, q, heads * d_kv)
