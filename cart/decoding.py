"""Trie-constrained beam search: `generate` plus one logits processor that masks invalid tokens.

`TrieConstraint` turns the prefix trie's allowed-token tables into one mask per decoding step for the
whole batch of beams. `decode` runs beam search with it and maps every finished identifier back to its
item, best first; `decode_texts` does it for a batch of query texts (the retriever's and validation's).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cart.trie import PrefixTrie
from cart.vocab import TokenLayout

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
    logits processor in place of `TrieConstraint(trie)` (the decoding benchmark's)."""
    if top_k > beams:
        raise ValueError(f"top_k={top_k} is larger than the beam width {beams}: raise the beam width")
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
    items = torch.from_numpy(trie.item_of(identifiers)).view(-1, top_k)
    # transformers fills the return slots that beam search could not fill (fewer valid identifiers than
    # beams) with copies of finished ones scored -1e9: those, like invalid identifiers, are no result
    repeated = (items.unsqueeze(2) == items.unsqueeze(1)).tril(-1).any(2)  # equal to an earlier slot
    dead = (items < 0) | repeated | ~torch.isfinite(scores) | (scores <= UNFILLED)
    return items.masked_fill(dead, -1), scores.masked_fill(dead, float("-inf"))


def decode_texts(model, tokenizer, trie: PrefixTrie, texts: list[str], *, beams: int, top_k: int, max_tokens: int,
                 device: torch.device, constraint: LogitsProcessor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`decode` for one batch of query texts: (B, top_k) corpus rows and log-probabilities, as NumPy."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt").to(device)
    items, scores = decode(model, encoded["input_ids"], encoded["attention_mask"], trie, beams=beams, top_k=top_k,
                           constraint=constraint)
    return items.numpy(), scores.numpy()
