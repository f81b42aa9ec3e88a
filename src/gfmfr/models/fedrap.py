"""FedRAP (Li et al., ICLR 2024, "Federated Recommendation with Additive Personalization").

Item representation = C + D_u: C is the shared global item table, D_u a private local table
(initialised to zero, so rows a client never trains stay exactly zero and cost no memory).
Private user vector. Loss = BCE - lambda_t ||D_u - C||^2 + mu_t ||C||_1, with the weights
ramped up as in the FedRAP paper, lambda_t = v1 tanh(t / 10) and mu_t = v2 tanh(t / 10), a
pure function of the round (the GFMFR reference multiplies them by tanh cumulatively from
round 0, which keeps them at zero). The two terms are mean-normalised over the rows a batch
scores, like the reference's MSE/L1 on its tables; applying them to those rows keeps every
untouched row unchanged.

Heads: ``dot`` (default, the FedRAP paper) scores u . (C_i + D_i); ``mlp`` (the GFMFR reference
variant) scores MLP([u ; C_i + D_i]) -> linear, each with its own default learning rates. Everything except C stays on the client,
the head included. GFMFR groups clients by their head and scores fused item vectors with the
group's mean head, so under GFMFR the server learns each participant's user vector and head
weights (for ``dot``: the user vector): a coarse description of taste, never an interaction.
"""

from __future__ import annotations

import math

import torch

from gfmfr.config import ModelConfig
from gfmfr.models.base import (
    FederatedRecommender,
    Params,
    ParamSpec,
    mlp_apply,
    mlp_specs,
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
    default_lrs = {"lr": 3.0, "item_lr": 100.0, "private_item_lr": 0.0}
    """The dot head's (the default), chosen on validation: the user vector and C learn at FCF's rates."""
    mlp_head_lrs = {"lr": 0.3, "item_lr": 30.0, "private_item_lr": 0.15}
    """The MLP head's (the GFMFR reference variant), chosen on ML-100K validation."""
    item_table = "C"

    @classmethod
    def lrs_for(cls, cfg: ModelConfig) -> dict[str, float]:
        return cls.mlp_head_lrs if cfg.fedrap_head == "mlp" else cls.default_lrs

    def __init__(self, n_items, cfg):
        super().__init__(n_items, cfg)
        if cfg.fedrap_head not in ("mlp", "dot"):
            raise ValueError(f"model.fedrap_head must be 'mlp' or 'dot', got {cfg.fedrap_head!r}")
        self.sizes = [2 * self.dim, *cfg.hidden]

    def param_specs(self) -> dict[str, ParamSpec]:
        c, d = self.cfg, self.dim
        specs = {
            "user": ParamSpec((d,), shared=False, lr=self.lr, weight_decay=c.weight_decay, same_init=False),
            "C": ParamSpec((d,), shared=True, lr=self.item_lr, weight_decay=c.weight_decay, item_table=True),
            "D": ParamSpec((d,), shared=False, lr=self.private_item_lr, weight_decay=c.weight_decay, item_table=True, init="zeros"),
        }
        if self.private_item_lr == 0:  # D_u never leaves zero: no table at all
            del specs["D"]
        if c.fedrap_head == "mlp":
            specs.update(mlp_specs("head", self.sizes, False, self.lr, c.weight_decay))
            specs["out.w"] = ParamSpec((self.sizes[-1],), shared=False, lr=self.lr, weight_decay=c.weight_decay)
            specs["out.b"] = ParamSpec((), shared=False, lr=self.lr, weight_decay=c.weight_decay, init="zeros")
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
        if self.cfg.fedrap_head == "dot":
            return ["user"]
        return ["user"] + [n for n in self.param_specs() if n.startswith(("head", "out"))]

    def head_weights(self, p: Params) -> torch.Tensor | None:
        return p["user"] if self.cfg.fedrap_head == "dot" else None

    def head_score(self, p: Params, vectors: torch.Tensor) -> torch.Tensor:
        if self.cfg.fedrap_head == "dot":
            return rowdot(vectors, p["user"])
        d = self.dim
        w0 = p["head0.w"]
        user_term = torch.einsum("ad,adh->ah", p["user"], w0[:, :d])
        hidden = mlp_apply({**p, "head0.w": w0[:, d:]}, "head", len(self.sizes) - 1, vectors, first=user_term)
        return rowdot(hidden, p["out.w"]) + p["out.b"][:, None]
