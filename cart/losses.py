"""The training loss: cross-entropy + omega * R-Drop's symmetric KL between two dropout passes
+ rank_weight * a listwise ranking loss of the right identifier against hard negatives.

With omega > 0 the batch is duplicated and both passes run in one forward, so each example sees two
dropout masks at the cost of one (twice as wide) step; a frozen encoder, having no dropout, runs once.
omega = 0 is the paper's "w/o consistency": one pass, cross-entropy only. The ranking loss (LTRGR's
ranking phase, with negatives from `data.HardNegatives` rather than each step's beams) scores whole
identifiers, which the token-level cross-entropy never compares: the negatives' identifiers run as
further stacked passes over the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Loss:
    total: torch.Tensor
    cross_entropy: torch.Tensor
    kl: torch.Tensor
    rank: torch.Tensor


def cart_loss(model, batch: dict, omega: float, rank_weight: float = 0.0) -> Loss:
    """batch: the model's inputs (`input_ids` or a frozen encoder's `encoder_layers`, and `attention_mask`),
    `labels`, (B, L) identifier tokens ending in EOS, -100 where ignored, and for the ranking loss
    `negatives`, (B, k, L) the same for k wrong items a query."""
    labels, negatives = batch["labels"], batch.get("negatives") if rank_weight > 0 else None
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "negatives")}
    copies = 2 if omega > 0 else 1
    stacked = [labels] * copies + (list(negatives.unbind(1)) if negatives is not None else [])
    logits = model(**inputs, labels=torch.cat(stacked), passes=len(stacked)).logits  # (passes * B, L, V)
    size = len(labels)
    cross_entropy = F.cross_entropy(logits[: copies * size].flatten(0, 1).float(),
                                    labels.repeat(copies, 1).flatten(), ignore_index=-100)
    kl = rank = torch.zeros_like(cross_entropy)
    if copies == 2:
        first, second = logits[: 2 * size].float().log_softmax(-1).chunk(2)  # (B, L, V) each
        keep = (labels != -100).unsqueeze(-1)
        # symmetric KL, summed over the vocabulary, averaged over the target tokens
        kl = (F.kl_div(first, second, log_target=True, reduction="none")
              + F.kl_div(second, first, log_target=True, reduction="none")).mul(keep).sum() / (2 * keep.sum())
    if negatives is not None:
        # each identifier's log-probability; the right one (the first pass) against its query's negatives
        rows = [logits[:size]] + list(logits[copies * size:].chunk(len(stacked) - copies))
        scores = torch.stack([sequence_log_prob(part, target) for part, target in zip(rows, [labels] + stacked[copies:])],
                             dim=1)  # (B, 1 + k)
        rank = F.cross_entropy(scores, torch.zeros(size, dtype=torch.long, device=scores.device))
    return Loss(cross_entropy + omega * kl + rank_weight * rank, cross_entropy, kl, rank)


def sequence_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits and (B, L) labels -> (B,) the summed log-probability of each row's labels."""
    keep = labels != -100
    picked = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.mul(keep).sum(1)
