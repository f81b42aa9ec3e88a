"""Non-learned baselines: item popularity and uniform random scores."""

from __future__ import annotations

import numpy as np
import torch

from gfmfr.data.dataset import Dataset


class Popularity:
    """Scores every item by its number of training interactions (the same list for every user)."""

    name = "popularity"

    def __init__(self, dataset: Dataset):
        self.counts = torch.from_numpy(np.bincount(dataset.train_items, minlength=dataset.n_items).astype(np.float32))

    def score(self, users: np.ndarray) -> torch.Tensor:
        return self.counts.expand(len(users), -1)


class RandomScores:
    """Independent uniform scores per (user, item), seeded."""

    name = "random"

    def __init__(self, dataset: Dataset, seed: int):
        self.n_items = dataset.n_items
        self.seed = seed

    def score(self, users: np.ndarray) -> torch.Tensor:
        from gfmfr.data.sampling import uniform

        return torch.from_numpy(uniform(self.seed, 99, users[:, None], np.arange(self.n_items)[None, :]).astype(np.float32))
