"""Non-learned baselines: item popularity, content similarity and uniform random scores.

Each is built from the dataset and the run's config and scores a batch of users at once.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from gfmfr.config import RunConfig
from gfmfr.data.dataset import Dataset
from gfmfr.data.encoders import dataset_features, present_modalities
from gfmfr.data.sampling import uniform
from gfmfr.federation.fast import ranges


class ScoreBaseline(Protocol):
    """What a baseline is: built from the data and the config, it scores every item for a batch of users."""

    name: str

    def __init__(self, dataset: Dataset, cfg: RunConfig) -> None: ...

    def score(self, users: np.ndarray) -> torch.Tensor:
        """Scores [len(users), n_items]; higher ranks first."""
        ...


class Popularity:
    """Scores every item by its number of training interactions (the same list for every user)."""

    name = "popularity"

    def __init__(self, dataset: Dataset, cfg: RunConfig):
        self.counts = torch.from_numpy(np.bincount(dataset.train_items, minlength=dataset.n_items).astype(np.float32))

    def score(self, users: np.ndarray) -> torch.Tensor:
        return self.counts.expand(len(users), -1)


def mean_rows(dataset: Dataset, table: torch.Tensor, users: np.ndarray) -> torch.Tensor:
    """[U, k]: each of ``users``' mean of ``table``'s rows [n_items, k] over its training items (0 for none)."""
    counts = torch.from_numpy(dataset.train_counts[users])
    owner = torch.repeat_interleave(torch.arange(len(users)), counts)
    items = torch.from_numpy(dataset.train_items[ranges(dataset.train_indptr[users], dataset.train_counts[users])])
    sums = torch.zeros(len(users), table.shape[1]).index_add_(0, owner, table[items])
    return sums / counts.clamp_min(1)[:, None]


class ContentKNN:
    """Content kNN: an item's score is its mean cosine similarity to the user's training items, over the
    content the data has (each modality of ``multimodal.modalities`` weighs the same). What item content
    alone says about a user's next item, with no collaborative signal at all."""

    name = "content-knn"

    def __init__(self, dataset: Dataset, cfg: RunConfig):

        content = dataset_features(dataset, cfg.multimodal.modalities)
        blocks = []
        for m in present_modalities(cfg.multimodal.modalities, content.features, "content kNN"):
            x = torch.from_numpy(content.features[m]) * torch.from_numpy(content.mask[m])[:, None]
            blocks.append(torch.nn.functional.normalize(x, dim=1))
        self.unit = torch.cat(blocks, 1) / len(blocks)
        self.dataset = dataset

    def score(self, users: np.ndarray) -> torch.Tensor:
        return mean_rows(self.dataset, self.unit, users) @ self.unit.T


class RandomScores:
    """Independent uniform scores per (user, item), seeded."""

    name = "random"

    def __init__(self, dataset: Dataset, cfg: RunConfig):
        self.n_items = dataset.n_items
        self.seed = cfg.seed

    def score(self, users: np.ndarray) -> torch.Tensor:

        return torch.from_numpy(
            uniform(self.seed, 99, users[:, None], np.arange(self.n_items)[None, :]).astype(np.float32)
        )
