"""GFMFR, group-aware multimodal fusion (docs/method.md, steps 4-8), as a plug-in for any base model.

- :mod:`.grouping`: clients grouped by their prediction heads (server);
- :mod:`.fusion`: the group fusion model Q_g(i) over group, content and item-ID views (server);
- :mod:`.server`: the server half: group targets, fusion, the teacher's preferences p_g;
- :mod:`.client`: the client half: the distillation term towards its group's p_g;
- :mod:`.distill`: the pure loss and schedule functions.
"""

from __future__ import annotations

import numpy as np

from gfmfr.config import RunConfig
from gfmfr.data.dataset import Dataset
from gfmfr.federation.plugin import Plugin
from gfmfr.models.base import FederatedRecommender
from gfmfr.plugins.group_fusion.client import DistillTerm
from gfmfr.plugins.group_fusion.server import GFMFRServer


def client_half(cfg: RunConfig) -> DistillTerm:
    """GFMFR's client half alone: all a node needs."""
    return DistillTerm(cfg.gfmfr, cfg.gfmfr.anneal_rounds or cfg.federation.rounds)


def build(
    dataset: Dataset,
    model: FederatedRecommender,
    cfg: RunConfig,
    features: dict[str, np.ndarray] | None = None,
    masks: dict[str, np.ndarray] | None = None,
) -> Plugin:
    """GFMFR's two halves for ``model`` on ``dataset`` (content features from the dataset unless given)."""
    return Plugin(GFMFRServer(dataset, model, cfg, features, masks), client_half(cfg))
