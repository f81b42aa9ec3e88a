"""Client-side preference-guided distillation (docs/method.md, step 8): pure functions.

For a training pair (u, i) of a client in group g, the term is
KL(Bernoulli(p_g(i)) || Bernoulli(yhat_ui)), weighted by w_t = r_t * cos(pi t / (2T)), where
r_t is an exponential moving average (decay 0.9) of L_base / L_KL: the term starts at the
scale of the base loss and anneals to zero by the last round.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_anneal(round_: int, total_rounds: int) -> float:
    """cos(pi * t / (2T)): 1 at round 0, 0 at round T."""
    return math.cos(math.pi * min(round_, total_rounds) / (2 * total_rounds))


def ema(previous: torch.Tensor, value: torch.Tensor, decay: float) -> torch.Tensor:
    """``decay * previous + (1 - decay) * value``; a NaN ``previous`` (no history yet) takes ``value``."""
    return torch.where(torch.isnan(previous), value, decay * previous + (1 - decay) * value)


def bernoulli_kl(teacher: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bernoulli(teacher) || Bernoulli(sigmoid(student_logits))), numerically stable.

    KL = cross-entropy(teacher, student) - entropy(teacher).
    """
    p = teacher.clamp(1e-6, 1 - 1e-6)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    return F.binary_cross_entropy_with_logits(student_logits, p, reduction="none") - entropy


def masked_mean(values: torch.Tensor, mask: torch.Tensor, nominal: int | None = None) -> torch.Tensor:
    """Per-row mean of ``values`` [A, B] over ``mask``, [A] (0 for an empty row).

    With ``nominal`` the sum is divided by that fixed count instead (the configured batch size),
    so that every pair weighs the same whatever the fill of its batch: a client's last, nearly
    empty batch would otherwise weigh each pair up to B times more (it diverged GFMFR-FedRAP).
    """
    total = (values * mask).sum(1)
    return total / nominal if nominal else total / mask.sum(1).clamp_min(1)


def recentre(teacher: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The teacher's probabilities [A, B] shifted in logit space, per row, so that their mean logit over
    ``mask`` equals the student's (detached): the differences between items stay the group's, the
    level becomes the client's own (``gfmfr.teacher_level = "client"``). A flat teacher then pulls
    no client's scores up or down."""
    logits = torch.logit(teacher.clamp(1e-6, 1 - 1e-6))
    shift = masked_mean(student_logits.detach() - logits, mask)
    return torch.sigmoid(logits + shift[:, None])


def distill_weight(ratio_ema: torch.Tensor, round_: int, total_rounds: int) -> torch.Tensor:
    """w_t = r_t * cos(pi t / (2T))."""
    return ratio_ema * cosine_anneal(round_, total_rounds)
