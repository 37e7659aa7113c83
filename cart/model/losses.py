"""The training loss: cross-entropy + omega * R-Drop's symmetric KL between two dropout passes
+ rank_weight * a listwise ranking loss of the right identifier against hard negatives.

With omega > 0 the batch is duplicated and both passes run in one forward, so each example sees two
dropout masks at the cost of one (twice as wide) step; a frozen encoder, having no dropout, runs once.
omega = 0 is the paper's "w/o consistency": one pass, cross-entropy only. The ranking loss (LTRGR's
ranking phase, with negatives from `batches.HardNegatives` rather than each step's beams) scores whole
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
    `negatives`, (B, k, L) the same for k wrong items a query; optionally `weights`, (B,) each example's weight
    in the cross-entropy, and `soft_labels`, (B, L, V) target distributions it then reads instead of `labels`
    (which still teacher-force the decoder)."""
    labels, negatives = batch["labels"], batch.get("negatives") if rank_weight > 0 else None
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "negatives", "items", "weights", "soft_labels")}
    copies = 2 if omega > 0 else 1
    targets = torch.stack([labels] * copies, dim=1)  # (B, passes, L): an example's passes side by side
    if negatives is not None:
        targets = torch.cat([targets, negatives], dim=1)
    size, passes = targets.shape[:2]
    logits = model(**inputs, labels=targets.flatten(0, 1), passes=passes).logits.unflatten(0, (size, passes))
    if "soft_labels" in batch:  # -sum q log p; a token outside its level has log p of about float32's min
        q, log_p = batch["soft_labels"].unsqueeze(1), logits[:, :copies].float().log_softmax(-1)
        tokens = -torch.where(q > 0, q * log_p, 0).sum(-1)  # (B, copies, L)
    else:
        tokens = F.cross_entropy(logits[:, :copies].flatten(0, 2).float(), targets[:, :copies].flatten(),
                                 ignore_index=-100, reduction="none").view(size, copies, -1)
    if "weights" in batch:  # each example's share of the mean over the target tokens, times its weight
        tokens = tokens * batch["weights"].view(-1, 1, 1)
    cross_entropy = tokens.sum() / (targets[:, :copies] != -100).sum()
    kl = rank = torch.zeros_like(cross_entropy)
    if copies == 2:
        first, second = logits[:, :2].float().log_softmax(-1).unbind(1)  # (B, L, V) each
        keep = (labels != -100).unsqueeze(-1)
        # symmetric KL, summed over the vocabulary, averaged over the target tokens
        kl = (F.kl_div(first, second, log_target=True, reduction="none")
              + F.kl_div(second, first, log_target=True, reduction="none")).mul(keep).sum() / (2 * keep.sum())
    if negatives is not None:
        # each identifier's log-probability; the right one (the first pass) against its query's negatives
        scored = torch.cat([logits[:, :1], logits[:, copies:]], dim=1)  # (B, 1 + k, L, V)
        scores = sequence_log_prob(scored, torch.cat([labels.unsqueeze(1), negatives], dim=1))  # (B, 1 + k)
        rank = F.cross_entropy(scores, torch.zeros(size, dtype=torch.long, device=scores.device))
    return Loss(cross_entropy + omega * kl + rank_weight * rank, cross_entropy, kl, rank)


def sequence_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., L, V) logits and (..., L) labels -> (...) the summed log-probability of each row's labels."""
    keep = labels != -100
    picked = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.mul(keep).sum(-1)
