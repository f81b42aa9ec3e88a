"""FCF / FedAvg-MF (Ammad-ud-din et al., 2019): score = u . v_i.

Shared: the item table. Private: the user vector, which is also the "head" (the map from an
item vector to a score), so GFMFR groups clients by their user vectors. A server that clusters
user vectors learns coarse taste groups; it never sees the vectors of clients' interactions.
"""

from __future__ import annotations

import torch

from gfmfr.models.base import FederatedRecommender, Params, ParamSpec, rowdot


class FCF(FederatedRecommender):
    """Federated matrix factorisation."""

    name = "fcf"
    default_lrs = {"lr": 3.0, "item_lr": 100.0}

    def param_specs(self) -> dict[str, ParamSpec]:
        c = self.cfg
        return {
            "user": ParamSpec((self.dim,), shared=False, lr=self.lr, weight_decay=c.weight_decay, same_init=False),
            "item": ParamSpec((self.dim,), shared=True, lr=self.item_lr, weight_decay=c.weight_decay, item_table=True),
        }

    def forward(self, p: Params, items: Params) -> torch.Tensor:
        return self.head_score(p, items["item"])

    def head_params(self) -> list[str]:
        return ["user"]

    def head_score(self, p: Params, vectors: torch.Tensor) -> torch.Tensor:
        return rowdot(vectors, p["user"])

    def head_weights(self, p: Params) -> torch.Tensor:
        return p["user"]
