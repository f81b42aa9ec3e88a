"""FedNCF (Perifanis & Efraimidis, KBS 2022): NeuMF trained with FedAvg.

Private: the user's GMF and MLP embeddings. Shared: the item table, the MLP tower and the
output layer. NeuMF's separate GMF and MLP item tables are merged into one table here, so that
there is one shared item table for plug-ins to work on; the GMF path uses the first half of
the item vector's dimensions against a GMF user vector of that size, the MLP path the whole
vector. Head (grouping signature and teacher head): the client's user embeddings plus its locally
trained tower and output layer. The server sees the tower and output layer anyway (FedAvg);
under GFMFR it also learns the participants' user embeddings.
"""

from __future__ import annotations

import torch

from gfmfr.models.base import (
    FederatedRecommender,
    Params,
    ParamSpec,
    mlp_apply,
    mlp_specs,
    rowdot,
)


class FedNCF(FederatedRecommender):
    """Federated NeuMF."""

    name = "fedncf"
    default_lrs = {"lr": 0.9, "item_lr": 30.0}

    def __init__(self, n_items, cfg):
        super().__init__(n_items, cfg)
        self.sizes = [2 * self.dim, *cfg.hidden]

    def param_specs(self) -> dict[str, ParamSpec]:
        c, d = self.cfg, self.dim
        specs = {
            "user_gmf": ParamSpec((d,), shared=False, lr=self.lr, weight_decay=c.weight_decay, same_init=False),
            "user_mlp": ParamSpec((d,), shared=False, lr=self.lr, weight_decay=c.weight_decay, same_init=False),
            "item": ParamSpec((d,), shared=True, lr=self.item_lr, weight_decay=c.weight_decay, item_table=True),
        }
        specs.update(mlp_specs("tower", self.sizes, True, self.lr, c.weight_decay))
        # ones: the GMF half starts as a plain dot product (NeuMF without pre-training otherwise barely moves under SGD)
        specs["out.w"] = ParamSpec(
            (d + self.sizes[-1],), shared=True, lr=self.lr, weight_decay=c.weight_decay, init="ones"
        )
        specs["out.b"] = ParamSpec((), shared=True, lr=self.lr, weight_decay=c.weight_decay, init="zeros")
        return specs

    def forward(self, p: Params, items: Params) -> torch.Tensor:
        return self.head_score(p, items["item"])

    def head_params(self) -> list[str]:
        return ["user_gmf", "user_mlp"] + [n for n in self.param_specs() if n.startswith(("tower", "out"))]

    def head_score(self, p: Params, vectors: torch.Tensor) -> torch.Tensor:
        d = self.dim
        w0, w = p["tower0.w"], p["out.w"]
        # GMF: w_gmf . (u_gmf * v) = (u_gmf * w_gmf) . v, and it shares one matmul over the item
        # vectors with the tower's first layer ([v ; u_mlp] W0 = v W0_item + u_mlp W0_user)
        gmf_w = (p["user_gmf"] * w[:, :d]).unsqueeze(-1)
        first = torch.matmul(vectors, torch.cat([w0[:, d:], gmf_w], 2))
        user_term = torch.einsum("ad,adh->ah", p["user_mlp"], w0[:, :d])
        x = torch.relu(first[..., :-1] + (p["tower0.b"] + user_term)[:, None, :])
        hidden = mlp_apply(p, "tower", len(self.sizes) - 1, x, start=1)
        return first[..., -1] + rowdot(hidden, w[:, d:]) + p["out.b"][:, None]
