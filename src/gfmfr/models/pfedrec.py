"""PFedRec (Zhang et al., IJCAI 2023, "Dual Personalization on Federated Recommendation").

No user embedding. Each client keeps a personal score function (a linear layer on the item
vector, then sigmoid) and fine-tunes the shared item table locally; only the item table is
uploaded. GFMFR's grouping signature is that personal score function: it is the only thing
that describes the user, so the server learns which clients score items alike. We chose it
over the uploaded item tables because it is small, and because the item tables say more
about which items a client touched. Evaluation scores each client with the received global
item table and its personal score function.
"""

from __future__ import annotations

import torch

from gfmfr.models.base import FederatedRecommender, Params, ParamSpec, rowdot


class PFedRec(FederatedRecommender):
    """Dual personalisation: personal score function, shared (locally fine-tuned) item table."""

    name = "pfedrec"
    default_lrs = {"lr": 3.0, "item_lr": 100.0}

    def param_specs(self) -> dict[str, ParamSpec]:
        c = self.cfg
        return {
            "item": ParamSpec((self.dim,), shared=True, lr=self.item_lr, weight_decay=c.weight_decay, item_table=True),
            "score.w": ParamSpec((self.dim,), shared=False, lr=self.lr, weight_decay=c.weight_decay),
            "score.b": ParamSpec((), shared=False, lr=self.lr, weight_decay=c.weight_decay, init="zeros"),
        }

    def forward(self, p: Params, items: Params) -> torch.Tensor:
        return self.head_score(p, items["item"])

    def head_params(self) -> list[str]:
        return ["score.w", "score.b"]

    def head_score(self, p: Params, vectors: torch.Tensor) -> torch.Tensor:
        return rowdot(vectors, p["score.w"]) + p["score.b"][:, None]

    def head_weights(self, p: Params) -> torch.Tensor:
        return p["score.w"]
