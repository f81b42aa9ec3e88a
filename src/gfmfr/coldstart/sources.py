"""Where a cold item's vector comes from: items no client has ever interacted with.

On the ``cold-items`` split (:func:`gfmfr.data.dataset.build_dataset`) no client trains a cold
item's row of the shared item table, so the server stands in for it from the item's public
content alone. Each source below gives the cold items' scores for a batch of users:

- :class:`GroupFused`: GFMFR's fused vectors Q_g(i) for the user's group (the fusion model fitted
  to the group targets of the known items; a cold item has no item-ID view);
- :class:`Projected`: MM-X's shared content projection ``sum_m x_m(i) W_m`` (its ID row unknown);
- :class:`AttributeNetwork`: IFedRec-style (Zhang et al., WWW 2024): an MLP on the server maps an
  item's content to its row of the FedAvg item table, fitted on the known items;
- :class:`ContentNeighbours`: the cosine between the cold item's content and the mean content of
  the user's training items (no vector: it ranks the cold items only);
- :class:`RandomVectors`: random vectors with the known rows' per-dimension mean and spread: the
  floor (popularity has nothing to say about an item nobody has seen).

A vector source scores through the base model's :meth:`~gfmfr.models.base.FederatedRecommender.head_score`
hook with each user's own parameters, as the client would on its device, so its scores sit on the
same scale as the known items' and the two can be ranked together.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from gfmfr.data.dataset import Dataset
from gfmfr.models.base import FederatedRecommender, Params
from gfmfr.models.baselines import mean_rows
from gfmfr.models.wrappers import MMX

SOURCES = ("gfmfr", "mmx", "ifedrec", "knn", "random")


def content_matrix(tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """The modalities' reduced, standardised features side by side, [n_items, sum k_m]."""
    return torch.cat([tables[m] for m in sorted(tables)], 1)


class ColdSource(ABC):
    """A source of the cold items' scores."""

    name: str
    has_vectors: bool = True
    """Whether it scores through item vectors (and so on the known items' scale: the all-items protocol)."""

    def refresh(self, shared: Params) -> None:
        """Bring the source up to date with the global parameters ``shared`` before an evaluation."""

    @abstractmethod
    def scores(self, model: FederatedRecommender, params: Params, users: np.ndarray) -> torch.Tensor:
        """Scores [U, n_cold] of the cold items for ``users``, whose per-client parameters are ``params``."""


def score_vectors(
    model: FederatedRecommender, params: Params, vectors: torch.Tensor, group: np.ndarray | None = None
) -> torch.Tensor:
    """Scores [U, N] of item ``vectors`` under the U users' heads (``params``): one table [1, N, d] for
    everyone, or one per group [G, N, d] with each user's group in ``group`` [U] (ungrouped: group 0)."""
    n_users = len(next(iter(params.values())))
    if len(vectors) > 1:
        vectors = vectors[torch.from_numpy(np.asarray(group)).clamp_min(0)]
    else:
        vectors = vectors.expand(n_users, *vectors.shape[1:])
    with torch.no_grad():
        return model.head_score(params, vectors)


class VectorSource(ColdSource):
    """A source that gives each cold item a vector, scored with each user's head."""

    vectors: torch.Tensor
    """The cold items' vectors as of the last :meth:`refresh`: [1, n_cold, d], or one table per group."""

    def group_of(self, users: np.ndarray) -> np.ndarray | None:
        """Each user's row of :attr:`vectors` when there is one per group."""
        return None

    def scores(self, model: FederatedRecommender, params: Params, users: np.ndarray) -> torch.Tensor:
        return score_vectors(model, params, self.vectors, self.group_of(users))


class RandomVectors(VectorSource):
    """Seeded Gaussian vectors matching the known rows' per-dimension mean and standard deviation."""

    name = "random"

    def __init__(self, dataset: Dataset, table: str, dim: int, seed: int):
        self.table = table
        self.warm = torch.from_numpy(dataset.warm_items)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 18)
        n_cold = 0 if dataset.cold_items is None else len(dataset.cold_items)
        self.noise = torch.randn(n_cold, dim, generator=gen)
        self.vectors = self.noise[None]

    def refresh(self, shared: Params) -> None:
        rows = shared[self.table][self.warm]
        self.vectors = (rows.mean(0) + rows.std(0) * self.noise)[None]


class Projected(VectorSource):
    """MM-X's content projection of each cold item (:meth:`gfmfr.models.wrappers.MMX.content_vectors`)."""

    name = "mmx"

    def __init__(self, model: FederatedRecommender, dataset: Dataset):

        if not isinstance(model, MMX):
            raise ValueError("the 'mmx' cold source needs wrapper = \"mmx\"")
        self.model = model
        self.cold = torch.from_numpy(dataset.cold_items)
        self.vectors = torch.zeros(1, len(self.cold), model.dim)

    def refresh(self, shared: Params) -> None:
        with torch.no_grad():
            self.vectors = self.model.content_vectors(shared, self.cold)[None]


class GroupFused(VectorSource):
    """GFMFR's Q_g(i) for each user's group (:meth:`~gfmfr.plugins.group_fusion.server.GFMFRServer.item_vectors`)."""

    name = "gfmfr"

    def __init__(self, server, dataset: Dataset, dim: int):
        self.server = server
        self.cold = torch.from_numpy(dataset.cold_items)
        self.vectors = torch.zeros(1, len(self.cold), dim)  # before the first server round: no knowledge

    def refresh(self, shared: Params) -> None:
        fused = self.server.item_vectors(self.cold)
        if fused is not None:
            self.vectors = fused

    def group_of(self, users: np.ndarray) -> np.ndarray | None:
        return self.server.grouping.group[users] if len(self.vectors) > 1 else None


class AttributeNetwork(VectorSource):
    """IFedRec-style attribute network: content -> item-table row, an MLP (hidden 2d, ReLU) fitted on
    the server by Adam to the known items' rows of the global table (mean squared error), warm-started
    from one evaluation to the next."""

    name = "ifedrec"

    def __init__(
        self,
        dataset: Dataset,
        content: torch.Tensor,
        table: str,
        dim: int,
        seed: int,
        steps: int = 200,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
    ):
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(content.shape[1], 2 * dim), torch.nn.ReLU(), torch.nn.Linear(2 * dim, dim)
        )
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        self.content = content
        self.table = table
        self.warm = torch.from_numpy(dataset.warm_items)
        self.cold = torch.from_numpy(dataset.cold_items)
        self.steps = steps
        self.fitted = False
        self.loss = float("nan")
        self.vectors = torch.zeros(1, len(self.cold), dim)

    def refresh(self, shared: Params) -> None:
        target = shared[self.table][self.warm]
        x = self.content[self.warm]
        steps = self.steps if self.fitted else 5 * self.steps  # a first fit starts from scratch
        for _ in range(steps):
            self.opt.zero_grad()
            loss = ((self.net(x) - target) ** 2).sum(1).mean()
            loss.backward()
            self.opt.step()
        self.fitted, self.loss = True, float(loss.detach())
        with torch.no_grad():
            self.vectors = self.net(self.content[self.cold])[None]


class ContentNeighbours(ColdSource):
    """Cosine between a cold item's content and the mean content of the user's training items (the
    mean of the cosines to each of them): a ranking of the cold items alone."""

    name = "knn"
    has_vectors = False

    def __init__(self, dataset: Dataset, content: torch.Tensor):
        unit = torch.nn.functional.normalize(content, dim=1)
        self.dataset = dataset
        self.unit = unit
        self.cold = unit[torch.from_numpy(dataset.cold_items)]

    def scores(self, model: FederatedRecommender, params: Params, users: np.ndarray) -> torch.Tensor:
        return mean_rows(self.dataset, self.unit, users) @ self.cold.T
