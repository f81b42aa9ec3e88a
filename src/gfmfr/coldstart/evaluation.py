"""Evaluation on the ``cold-items`` split: the cold items scored by a source, the known ones by the model.

The run's own source (``eval.cold_source``) selects the best round on validation; at that round the
test split is also scored with every other source the run can build, reported as ``knn NDCG@10``,
``ifedrec all HR@50`` and so on beside the plain keys of the run's source.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from gfmfr.coldstart.sources import (
    SOURCES,
    AttributeNetwork,
    ColdSource,
    ContentNeighbours,
    GroupFused,
    Projected,
    RandomVectors,
    content_matrix,
)
from gfmfr.config import RunConfig
from gfmfr.data.dataset import Dataset
from gfmfr.data.encoders import dataset_features
from gfmfr.eval.evaluator import Evaluator
from gfmfr.federation.plugin import Plugin
from gfmfr.federation.state import FederationState
from gfmfr.models.base import FederatedRecommender
from gfmfr.models.wrappers import content_tables

log = logging.getLogger(__name__)


def cold_rows(results: dict, cfg: RunConfig) -> dict[str, dict[str, float]]:
    """A cold-items run's metrics as table rows: validation and test with its own source, then the
    test of every source among the cold items (``test <source>``) and among all items (``all <source>``)."""
    test = results["test"]
    names = [primary_source(cfg)] + sorted(
        {k.split(" ")[0] for k in test if k.split(" ")[0] in SOURCES} - {primary_source(cfg)}
    )
    rows = {f"valid {names[0]}": results["valid"]}
    for name in names:
        prefix = "" if name == names[0] else f"{name} "
        rows[f"test {name}"] = {k[len(prefix) :]: v for k, v in test.items() if k.startswith(prefix)}
        if f"{prefix}all NDCG@10" in test:
            rows[f"all {name}"] = {k[len(prefix) + 4 :]: v for k, v in test.items() if k.startswith(f"{prefix}all ")}
    return rows


def primary_source(cfg: RunConfig) -> str:
    """The source that selects the run's best round: ``eval.cold_source``, or for ``auto`` the run's
    own content method (GFMFR's fused vectors, MM-X's projection), else the IFedRec-style network."""
    if cfg.eval.cold_source != "auto":
        return cfg.eval.cold_source
    if cfg.plugin == "gfmfr":
        return "gfmfr"
    return "mmx" if cfg.wrapper == "mmx" else "ifedrec"


class ColdStart:
    """Scores of every item for a batch of users: the model's for the known items, a source's for the
    cold ones (:meth:`score`); :meth:`evaluate` runs the protocol with the run's source (and, on the
    test split, every other one)."""

    def __init__(
        self,
        dataset: Dataset,
        model: FederatedRecommender,
        cfg: RunConfig,
        plugins: tuple[Plugin, ...],
        state: FederationState,
    ):
        if dataset.cold_items is None:
            raise ValueError('ColdStart needs the cold-items split (data.split = "cold-items")')
        self.dataset, self.model, self.state = dataset, model, state
        self.cold = torch.from_numpy(dataset.cold_items)
        table, dim = model.item_table, model.dim
        self.sources: dict[str, ColdSource] = {"random": RandomVectors(dataset, table, dim, cfg.seed)}
        if dataset.item_features or dataset.item_text is not None or dataset.item_image is not None:
            content = content_matrix(self._content(dataset, cfg))
            self.sources["ifedrec"] = AttributeNetwork(dataset, content, table, dim, cfg.seed)
            self.sources["knn"] = ContentNeighbours(dataset, content)
        if cfg.wrapper == "mmx":
            self.sources["mmx"] = Projected(model, dataset)
        for plugin in plugins:
            if hasattr(plugin.server, "item_vectors"):
                self.sources["gfmfr"] = GroupFused(plugin.server, dataset, dim)
        name = primary_source(cfg)
        if name not in self.sources:
            raise ValueError(
                f"eval.cold_source {name!r} cannot be built for this run (it has "
                f"{sorted(self.sources)}; content sources need --content DIR)"
            )
        self.primary = self.sources[name]

    @staticmethod
    def _content(dataset: Dataset, cfg: RunConfig) -> dict[str, torch.Tensor]:

        mm = cfg.multimodal
        features = dataset_features(dataset, mm.modalities)
        return content_tables(features.features, features.mask, mm.modalities, mm.content_dim, cfg.seed)

    def score(self, source: ColdSource, users: np.ndarray) -> torch.Tensor:
        """Logits [U, n_items]: the model's, with the cold items' columns from ``source``."""
        scores = self.state.score(users).clone()
        scores[:, self.cold] = source.scores(self.model, self.state.client_params(users), users).to(scores.dtype)
        return scores

    def evaluate(self, evaluator: Evaluator, split: str) -> dict[str, float]:
        """The metrics of the run's source on ``split``; on ``test`` also every other source's, prefixed
        by its name."""
        shared = self.state.shared
        self.primary.refresh(shared)
        out = evaluator.evaluate(lambda u: self.score(self.primary, u), split, all_items=self.primary.has_vectors)
        if split == "test":
            for name, source in self.sources.items():
                if source is self.primary:
                    continue
                source.refresh(shared)
                metrics = evaluator.evaluate(functools.partial(self.score, source), split, all_items=source.has_vectors)
                out.update({f"{name} {k}": v for k, v in metrics.items()})
        return out
