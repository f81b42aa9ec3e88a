"""Client-side preference-guided distillation (docs/method.md, step 8): pure functions.

For a training pair (u, i) of a client in group g, the term is
KL(Bernoulli(p_g(i)) || Bernoulli(yhat_ui)), weighted by w_t = r_t * cos(pi t / (2T)), where
r_t is an exponential moving average (decay 0.9) of L_base / L_KL: the term starts at the
scale of the base loss and anneals to zero by the last round. With a warm-up of W rounds the
weight is first ramped up by exp(-5 (1 - t/W)^2) (Laine and Aila, ICLR 2017, the ramp of
temporal ensembling and the mean teacher), so that an untrained teacher does not hold the
clients back in the first rounds.
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


def ramp_up(round_: int, warmup_rounds: int) -> float:
    """exp(-5 (1 - t/W)^2) for t < W, then 1; 1 throughout when W = 0 (no warm-up)."""
    if round_ >= warmup_rounds:
        return 1.0
    return math.exp(-5.0 * (1.0 - round_ / warmup_rounds) ** 2)


def distill_weight(ratio_ema: torch.Tensor, round_: int, total_rounds: int, warmup_rounds: int = 0) -> torch.Tensor:
    """w_t = r_t * cos(pi t / (2T)), times the warm-up ramp."""
    return ratio_ema * (cosine_anneal(round_, total_rounds) * ramp_up(round_, warmup_rounds))
