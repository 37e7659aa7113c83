"""The training loss: cross-entropy + omega * R-Drop's symmetric KL between two dropout passes.

With omega > 0 the batch is duplicated and both passes run in one forward, so each example sees two
dropout masks at the cost of one (twice as wide) step; a frozen encoder, having no dropout, runs once.
omega = 0 is the paper's "w/o consistency": one pass, cross-entropy only.
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


def cart_loss(model, batch: dict, omega: float) -> Loss:
    """batch: the model's inputs (`input_ids` or a frozen encoder's `encoder_layers`, and `attention_mask`)
    and `labels`, (B, L) identifier tokens ending in EOS, -100 where ignored."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    passes = 2 if omega > 0 else 1
    logits = model(**inputs, labels=labels.repeat(passes, 1), passes=passes).logits  # (passes * B, L, V)
    targets = labels.repeat(passes, 1)
    cross_entropy = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    if passes == 1:
        return Loss(cross_entropy, cross_entropy, torch.zeros_like(cross_entropy))
    first, second = logits.float().log_softmax(-1).chunk(2)  # (B, L, V) each
    keep = (labels != -100).unsqueeze(-1)
    # symmetric KL, summed over the vocabulary, averaged over the target tokens
    kl = (F.kl_div(first, second, log_target=True, reduction="none")
          + F.kl_div(second, first, log_target=True, reduction="none")).mul(keep).sum() / (2 * keep.sum())
    return Loss(cross_entropy + omega * kl, cross_entropy, kl)
