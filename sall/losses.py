"""The SALL loss: per head, cross-entropy between a target distribution and softmax(z / T).

A hard label is a one-hot target; a synergic adversarial label is the soft target
softmax(teacher(x) / T). Rows without a target for a head (mask False) put no gradient into it.
The total is the sum over heads (paper eq. 6).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def soft_labels(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): the synergic adversarial label (paper eq. 2 and 10)."""
    return F.softmax(logits.float() / temperature, dim=-1)


def head_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over masked rows of CE(target, softmax(logits / T)); 0 (with a graph) if none."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    per_row = -(target * logp).sum(dim=-1)
    m = mask.to(per_row.dtype)
    return (per_row * m).sum() / m.sum().clamp_min(1.0)


def sall_loss(
    logits: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    temperature: float | Mapping[str, float],
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the heads' losses, and each head's value for logging. `temperature` is one T for
    every head, or a T per head: students of several temperatures trained as one model
    (sall/fused.py) sum their heads' losses, each at its own T."""
    temps = temperature if isinstance(temperature, Mapping) else dict.fromkeys(logits, temperature)
    parts = {t: head_loss(logits[t], targets[t], masks[t], temps[t]) for t in logits}
    total = sum(parts.values())
    return total, {t: float(v.detach()) for t, v in parts.items()}
