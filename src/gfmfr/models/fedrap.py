"""FedRAP (Li et al., ICLR 2024, "Federated Recommendation with Additive Personalization").

Item representation = C + D_u: C is the shared global item table, D_u a private local table
(initialised to zero, so rows a client never trains stay exactly zero and cost no memory).
Private user vector. Loss = BCE - lambda_t ||D_u - C||^2 + mu_t ||C||_1, with the weights
ramped up as in the FedRAP paper, lambda_t = v1 tanh(t / 10) and mu_t = v2 tanh(t / 10), a
pure function of the round (the GFMFR reference multiplies them by tanh cumulatively from
round 0, which keeps them at zero). The two terms are mean-normalised over the rows a batch
scores, like the reference's MSE/L1 on its tables; applying them to those rows keeps every
untouched row unchanged.

The score is the FedRAP paper's dot product u . (C_i + D_i). Everything except C stays on the
client. GFMFR groups clients by their user vector (the head) and scores fused item vectors with the
group's mean, so under GFMFR the server learns each participant's user vector: a coarse
description of taste, never an interaction.
"""

from __future__ import annotations

import math

import torch

from gfmfr.models.base import (
    FederatedRecommender,
    Params,
    ParamSpec,
    rowdot,
)


class _Regulariser(torch.autograd.Function):
    """Per-client sum_b m_b (-lam ||D_b - C_b||^2 + mu ||C_b||_1) / n with a hand-written backward.

    The same value as the plain expression, computed in one pass: autograd through the plain
    expression spends about a third of a FedRAP round (tests/test_fedrap.py checks the gradient).
    """

    @staticmethod
    def forward(ctx, d, c, mask, n, lam, mu):  # type: ignore[override]
        gap = d - c
        sq = torch.linalg.vector_norm(gap, 2, dim=-1).square_()
        per_row = sq.mul_(-lam).add_(c.abs().sum(-1), alpha=mu)
        w = (mask / n[:, None]).unsqueeze(-1)
        ctx.save_for_backward(gap, c, w)
        ctx.lam, ctx.mu = lam, mu
        return (per_row * mask).sum(1) / n

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        gap, c, w = ctx.saved_tensors
        w = w * grad[:, None, None]
        pull = gap * (w * (2 * ctx.lam))  # = -dR/dD
        grad_c = torch.addcmul(pull, torch.sign(c), w, value=ctx.mu)
        return pull.neg_(), grad_c, None, None, None, None


def ramp(weight: float, round_: int) -> float:
    """FedRAP's schedule for its regulariser weights: ``weight * tanh(round / 10)``."""
    return weight * math.tanh(round_ / 10.0)


class FedRAP(FederatedRecommender):
    """Additive personalisation: shared C plus private D_u."""

    name = "fedrap"
    default_lrs = {"lr": 3.0, "item_lr": 100.0, "private_item_lr": 0.003}
    """Chosen on validation: the user vector and C learn at FCF's rates; D_u at the rate that raised
    validation on all three datasets measured (docs/method.md, 'Base models')."""
    item_table = "C"

    def param_specs(self) -> dict[str, ParamSpec]:
        c, d = self.cfg, self.dim
        specs = {
            "user": ParamSpec((d,), shared=False, lr=self.lr, weight_decay=c.weight_decay, same_init=False),
            "C": ParamSpec((d,), shared=True, lr=self.item_lr, weight_decay=c.weight_decay, item_table=True),
            "D": ParamSpec(
                (d,), shared=False, lr=self.private_item_lr, weight_decay=c.weight_decay, item_table=True, init="zeros"
            ),
        }
        if self.private_item_lr == 0:  # D_u never leaves zero: no table at all
            del specs["D"]
        return specs

    def forward(self, p: Params, items: Params) -> torch.Tensor:
        if "D" not in items:  # D_u still at zero: C alone, and a broadcast C stays broadcast
            return self.head_score(p, items["C"])  # (scoring every user is then one matrix product)
        return self.head_score(p, items["C"] + items["D"])

    def regularizer(self, p: Params, items: Params, mask: torch.Tensor, round_: int) -> torch.Tensor | None:
        lam, mu = ramp(self.cfg.fedrap_lambda, round_), ramp(self.cfg.fedrap_mu, round_)
        if lam == 0 and mu == 0:
            return None
        n = mask.sum(1).clamp_min(1) * self.dim
        c = items["C"]
        d = items["D"] if "D" in items else c.new_zeros(()).expand_as(c)  # D_u still: zero
        return _Regulariser.apply(d, c, mask, n, lam, mu)

    def head_params(self) -> list[str]:
        return ["user"]

    def head_weights(self, p: Params) -> torch.Tensor | None:
        return p["user"]

    def head_score(self, p: Params, vectors: torch.Tensor) -> torch.Tensor:
        return rowdot(vectors, p["user"])
