"""GFMFR's client half: preference-guided distillation (docs/method.md, step 8).

For a training pair (u, i) of a client whose hint is its group's preferences p_g, the term is
KL(Bernoulli(p_g(i)) || Bernoulli(yhat_ui)) on the sampled negatives (or every pair,
``distill_on``), summed over the batch and divided by the configured batch size (the group's
p_g recentred on the client's own level with ``teacher_level = "client"``), weighted by
w_t = r_t * cos(pi t / (2T)). r_t, the client's moving average of L_base / L_KL capped at
``max_ratio``, lives in the client's own state. A client without a hint trains on its base loss.
"""

from __future__ import annotations

import torch

from gfmfr.config import GFMFRConfig
from gfmfr.federation.batch import Batch
from gfmfr.federation.plugin import LossContext
from gfmfr.plugins.group_fusion.distill import (
    bernoulli_kl,
    distill_weight,
    ema,
    masked_mean,
    recentre,
)


def distill_mask(batch: Batch, on: str) -> torch.Tensor:
    """[A, B] 1 on the pairs the KL term covers: every real pair, or only the sampled negatives."""
    if on == "all":
        return batch.mask
    if on == "negatives":
        return batch.mask * (1 - batch.labels)
    raise ValueError(f"gfmfr.distill_on must be 'all' or 'negatives', got {on!r}")


class DistillTerm:
    """The distillation term a client adds to its local loss (a :class:`~gfmfr.federation.plugin.LossTerm`)."""

    state_init = {"gfmfr_ratio": float("nan")}
    """The client's moving average r_t of L_base / L_KL (NaN: no history yet)."""
    figures: tuple[str, ...] = ("distill_weight", "distill_kl", "distill_steps")
    """The distillation weight w_t, the KL term and the steps with a hint, summed over the steps."""

    def __init__(self, cfg: GFMFRConfig, total_rounds: int):
        self.cfg = cfg
        self.total_rounds = total_rounds

    def loss(self, ctx: LossContext) -> torch.Tensor | None:
        row = torch.from_numpy(ctx.hints.row)
        has = row >= 0
        if not has.any():
            return None
        target = ctx.hints.table[row.clamp_min(0)[:, None], ctx.batch.items]
        mask = distill_mask(ctx.batch, self.cfg.distill_on)
        if self.cfg.teacher_level == "client":
            target = recentre(target, ctx.logits, mask)
        kl = masked_mean(bernoulli_kl(target, ctx.logits), mask, ctx.batch_size)
        # FedRAP's base loss can be negative (its -lambda ||D - C||^2 term): a negative ratio
        # would turn the KL term into a reward for disagreeing, so the ratio is clamped at 0
        raw = (ctx.base_loss / kl.detach().clamp_min(1e-6)).clamp(0.0, self.cfg.max_ratio)
        previous = ctx.state["gfmfr_ratio"]
        ratio = ema(previous, raw, self.cfg.ema_decay)
        ctx.state["gfmfr_ratio"] = torch.where(has, ratio, previous)
        weight = distill_weight(ratio, ctx.round, self.total_rounds)
        ctx.figures.update(distill_weight=weight * has, distill_kl=kl.detach() * has, distill_steps=has.float())
        return torch.where(has, weight * kl, torch.zeros_like(kl))
