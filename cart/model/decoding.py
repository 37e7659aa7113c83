"""Trie-constrained beam search: identifiers of real items only, best first.

`decode` runs it and maps every finished identifier back to its item; `decode_texts` does it for a batch
of query texts (the retriever's and validation's). Two searches, one result (tests hold them equal):

- A model with the level softmax (every configuration we ship) gets a beam search of our own. There every
  identifier has the same length and step l chooses among level l's codes alone, so beam search is a top-k
  over (beams x level codes) a step, and each beam carries its trie node to the next step (one lookup a
  beam, `PrefixTrie.child`). transformers' `generate` would score and mask the whole vocabulary each step
  and, handing a logits processor no beam indices, make the trie walk every prefix from the root: 3-4% of
  decode time at 1M items where ours spends well under 1% on the trie.
- Any other model goes through `generate` with `TrieConstraint`, a logits processor that turns the trie's
  tables into one mask a step for the whole batch of beams.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from cart.index.trie import PrefixTrie
from cart.index.vocab import TokenLayout
from cart.model.fusion import FusedMemory
from cart.model.losses import sequence_log_prob

UNFILLED = -1e8  # a sequence score this low is transformers' filler (-1e9), not a log-probability


class TrieConstraint(LogitsProcessor):
    """Only tokens that continue a valid identifier keep their score; the rest get -inf.

    A beam whose prefix left the trie (beam search fills a beam with a forbidden token when fewer valid
    continuations exist than beams) may only emit EOS: never an empty choice, so never NaN. What may
    follow lies in one level's token range, so only that slice of the scores is masked token by token."""

    def __init__(self, trie: PrefixTrie):
        if not isinstance(trie, PrefixTrie):
            raise ValueError(f"TrieConstraint needs a PrefixTrie, got {type(trie).__name__}")
        self.trie = trie

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[1] < self.trie.vocab:
            raise ValueError(f"the model scores {scores.shape[1]} tokens, fewer than the trie's {self.trie.vocab}")
        prefixes = input_ids[:, 1:].cpu().numpy()  # (B * beams, l): drop the decoder start token
        log_mask, ending = self.trie.log_mask(prefixes, strict=False)
        out = torch.full_like(scores, float("-inf"))  # a wider output layer's extra tokens included: never those
        if log_mask.shape[1]:
            level = slice(*self.trie.layout.level_range(prefixes.shape[1]))
            out[:, level] = scores[:, level] + torch.from_numpy(log_mask).to(scores.device, scores.dtype)
        eos = TokenLayout.EOS
        out[:, eos] = scores[:, eos].masked_fill(~torch.from_numpy(ending).to(scores.device), float("-inf"))
        return out


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, trie: PrefixTrie, *,
           beams: int, top_k: int, constraint: LogitsProcessor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search constrained to the trie -> items (B, top_k) and their log-probabilities (B, top_k);
    item -1 with score -inf where fewer than top_k valid identifiers were found. `constraint`: another
    logits processor in place of `TrieConstraint(trie)`, run through `generate` (the decoding benchmark's)."""
    if top_k > beams:
        raise ValueError(f"top_k={top_k} is larger than the beam width {beams}: raise the beam width")
    if constraint is None and getattr(model.config, "cart_level_softmax", False):
        items, scores = _level_beam_search(model, input_ids, attention_mask, trie, beams=beams)
    else:
        items, scores = _generate(model, input_ids, attention_mask, trie, beams=beams, top_k=top_k,
                                  constraint=constraint)
    missing = top_k - items.shape[1]  # our search keeps fewer beams while there are fewer identifiers
    items = nn.functional.pad(items[:, :top_k], (0, max(missing, 0)), value=-1)
    scores = nn.functional.pad(scores[:, :top_k], (0, max(missing, 0)), value=float("-inf"))
    # transformers fills the return slots that beam search could not fill (fewer valid identifiers than
    # beams) with copies of finished ones scored -1e9: those, like invalid identifiers, are no result
    repeated = (items.unsqueeze(2) == items.unsqueeze(1)).tril(-1).any(2)  # equal to an earlier slot
    dead = (items < 0) | repeated | ~torch.isfinite(scores) | (scores <= UNFILLED)
    return items.masked_fill(dead, -1), scores.masked_fill(dead, float("-inf"))


@torch.no_grad()
def _level_beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, trie: PrefixTrie, *,
                      beams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search of a level-softmax model (`CartT5.level_log_probs`) over the trie's identifiers ->
    items (B, k) and their log-probabilities (B, k), best first, k = min(beams, beams x level sizes); a
    beam that had to take a forbidden code (fewer valid continuations than beams) scores -inf, item -1."""
    memory = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    queries, device = len(input_ids), input_ids.device
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    tokens = torch.full((queries, 1), model.config.decoder_start_token_id, device=device)
    scores = torch.zeros(queries, 1, device=device)  # (B, beams so far): each beam's log-probability
    paths = torch.zeros(queries, 1, 0, dtype=torch.long, device=device)  # (B, beams so far, depth): its tokens
    node = np.zeros(queries, dtype=np.int64)  # its trie node, -1 once it left the trie
    rows_memory = {}  # beams so far -> the memory and mask the rows read (copied a row without fusion)
    for depth in range(trie.length):
        if paths.shape[1] not in rows_memory:  # one query's row at the first step, its beams after
            rows_memory[paths.shape[1]] = _memory_for_rows(model, memory, attention_mask, paths.shape[1])
        log_probs = model.level_log_probs(tokens, *rows_memory[paths.shape[1]], cache)  # (rows, V_l)
        log_probs += torch.from_numpy(trie.level_mask(node, depth)).to(device)
        width = log_probs.shape[1]
        total = (log_probs + scores.view(-1, 1)).view(queries, -1)  # (B, beams so far x V_l)
        scores, index = total.topk(min(beams, total.shape[1]), dim=1)  # sorted, best first
        # each new beam's parent row (rows b * beams so far + j) and the code it adds
        rows = (torch.arange(queries, device=device).unsqueeze(1) * paths.shape[1] + index // width).flatten()
        code = index % width
        token = code + trie.layout.offsets[depth]
        paths = torch.cat([paths.flatten(0, 1)[rows].view(*token.shape, depth), token.unsqueeze(-1)], dim=-1)
        if depth + 1 < trie.length:
            node = trie.child(node[rows.cpu().numpy()], depth, code.flatten().cpu().numpy())
            cache.reorder_cache(rows)
            tokens = token.view(-1, 1)
    items = torch.from_numpy(trie.item_of(paths.flatten(0, 1).cpu().numpy())).view(scores.shape)
    return items, scores.float().cpu()


def _generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, trie: PrefixTrie, *,
              beams: int, top_k: int, constraint: LogitsProcessor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate`'s beam search (greedy search for one beam) under `constraint` or `TrieConstraint(trie)`."""
    constraint = LogitsProcessorList([constraint or TrieConstraint(trie)])
    # with the level softmax the position after an identifier may emit EOS alone, at log-probability 0:
    # that decoding step changes no score, so it is not run
    steps = trie.length + (0 if getattr(model.config, "cart_level_softmax", False) else 1)
    if beams == 1:  # greedy search
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=1, do_sample=False,
                             max_new_tokens=steps, logits_processor=constraint,
                             output_logits=True, return_dict_in_generate=True)
        # greedy search keeps no sequence score: sum the chosen tokens' log-probabilities, as beam search does
        # (log-softmax over every token, before the constraint masks any)
        chosen = out.sequences[:, 1:]  # (B, steps): the identifier (and EOS)
        log_probs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, steps, V)
        scores = log_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).sum(1).cpu().view(-1, 1)
    else:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=beams,
                             num_return_sequences=top_k, max_new_tokens=steps,
                             length_penalty=0.0, early_stopping=True, do_sample=False, logits_processor=constraint,
                             output_scores=True, return_dict_in_generate=True)
        scores = out.sequences_scores.float().cpu().view(-1, top_k)
    identifiers = out.sequences[:, 1: trie.length + 1].cpu().numpy()  # (B * top_k, L)
    return torch.from_numpy(trie.item_of(identifiers)).view(-1, top_k), scores


def decode_texts(model, tokenizer, trie: PrefixTrie, texts: list[str], *, beams: int, top_k: int, max_tokens: int,
                 device: torch.device, constraint: LogitsProcessor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`decode` for one batch of query texts: (B, top_k) corpus rows and log-probabilities, as NumPy."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt").to(device)
    items, scores = decode(model, encoded["input_ids"], encoded["attention_mask"], trie, beams=beams, top_k=top_k,
                           constraint=constraint)
    return items.numpy(), scores.numpy()


@torch.no_grad()
def score_identifiers(model, tokenizer, texts: list[str], tokens: np.ndarray, *, max_tokens: int,
                      device: torch.device, chunk: int = 256) -> np.ndarray:
    """The log-probability of identifiers under query texts, by teacher forcing: (Q, C) for Q texts and
    `tokens` (C, L), the identifiers' decoder tokens, every one under every text; or (Q, C, L), each text's
    own C. The same number beam search reports for an identifier it finds (EOS included: with the level
    softmax its log-probability is 0), for any identifier, found or not. The texts are encoded once; a
    query's candidates run as passes over its memory."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt").to(device)
    mask = encoded["attention_mask"]
    memory = model.get_encoder()(input_ids=encoded["input_ids"], attention_mask=mask)
    labels = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)
    own = labels.dim() == 3  # each text its own candidates
    eos = torch.full((*labels.shape[:-1], 1), TokenLayout.EOS, device=device)
    labels = torch.cat([labels, eos], dim=-1)  # (C, L + 1) or (Q, C, L + 1)
    scores = []
    for start in range(0, labels.shape[-2], chunk):
        part = labels[..., start: start + chunk, :]
        width = part.shape[-2]
        targets = part.reshape(-1, part.shape[-1]) if own else part.repeat(len(texts), 1)  # rows q * C' + c
        rows_memory, rows_mask = _memory_for_rows(model, memory, mask, width)
        logits = model(encoder_outputs=rows_memory, attention_mask=rows_mask, labels=targets).logits
        scores.append(sequence_log_prob(logits, targets).view(len(texts), width))
    return torch.cat(scores, dim=1).float().cpu().numpy() if scores else np.zeros((len(texts), 0), np.float32)


def _memory_for_rows(model, memory: FusedMemory, mask: torch.Tensor,
                     per_query: int) -> tuple[FusedMemory, torch.Tensor]:
    """The memory and mask for decoder rows that come `per_query` a query, consecutive: with fusion the rows
    of a query read its one memory side by side; plain cross-attention reads a memory a row (copied)."""
    if model.config.cart_fusion:
        return memory, mask
    return (FusedMemory(last_hidden_state=memory.last_hidden_state.repeat_interleave(per_query, 0),
                        pooled=memory.pooled), mask.repeat_interleave(per_query, 0))
