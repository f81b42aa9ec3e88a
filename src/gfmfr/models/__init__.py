"""Base recommenders: one file per model, one contract (:class:`FederatedRecommender`)."""

from __future__ import annotations

from gfmfr.config import ModelConfig
from gfmfr.models.base import FederatedRecommender, Params, ParamSpec
from gfmfr.models.baselines import ContentKNN, Popularity, RandomScores, ScoreBaseline
from gfmfr.models.fcf import FCF
from gfmfr.models.fedncf import FedNCF
from gfmfr.models.fedrap import FedRAP
from gfmfr.models.pfedrec import PFedRec

FEDERATED_MODELS: dict[str, type[FederatedRecommender]] = {m.name: m for m in (FCF, FedNCF, PFedRec, FedRAP)}
BASELINES: dict[str, type[ScoreBaseline]] = {
    "popularity": Popularity,
    "content-knn": ContentKNN,
    "random": RandomScores,
}


def build_model(n_items: int, cfg: ModelConfig) -> FederatedRecommender:
    """The federated base model that ``cfg.name`` names."""
    try:
        return FEDERATED_MODELS[cfg.name](n_items, cfg)
    except KeyError:
        raise ValueError(
            f"unknown model {cfg.name!r}; choose from {sorted(FEDERATED_MODELS) + sorted(BASELINES)}"
        ) from None


__all__ = ["FEDERATED_MODELS", "BASELINES", "FederatedRecommender", "Params", "ParamSpec", "build_model"]
