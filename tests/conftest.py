"""Shared fixtures: small synthetic federations generated in code."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gfmfr.config import DataConfig
from gfmfr.data.dataset import Dataset, build_dataset
from gfmfr.data.sources import RawData


def planted_frame(
    n_users: int = 80, n_items: int = 60, n_groups: int = 4, per_user: int = 16, purity: float = 0.9, seed: int = 0
) -> pd.DataFrame:
    """Users in ``n_groups`` communities, each interacting mostly with its community's items.

    Within a community, items have a skewed popularity; across communities global popularity is
    flat, so popularity ranking is weak and any collaborative model can do much better.
    """
    rng = np.random.default_rng(seed)
    items_per_group = n_items // n_groups
    rows = []
    for u in range(n_users):
        g = u % n_groups
        own = np.arange(g * items_per_group, (g + 1) * items_per_group)
        weights = 1.0 / np.arange(1, len(own) + 1) ** 0.5
        n_own = int(round(per_user * purity))
        chosen = set(rng.choice(own, size=n_own, replace=False, p=weights / weights.sum()).tolist())
        while len(chosen) < per_user:
            chosen.add(int(rng.integers(n_items)))
        for t, i in enumerate(rng.permutation(sorted(chosen))):
            rows.append((f"u{u}", f"{i}", 4.0, 1000 + t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def dataset_from_frame(frame: pd.DataFrame, cfg: DataConfig | None = None) -> Dataset:
    inter = frame.copy()
    inter["line"] = np.arange(2, len(inter) + 2)
    return build_dataset(RawData(interactions=inter, source="synthetic.csv"), cfg or DataConfig(), name="synthetic")


@pytest.fixture(scope="session")
def planted() -> Dataset:
    """A planted federation: 80 clients, 60 items, 4 communities."""
    return dataset_from_frame(planted_frame())


@pytest.fixture()
def planted_folder(tmp_path):
    """The planted federation written as a generic data folder."""
    planted_frame().to_csv(tmp_path / "interactions.csv", index=False)
    return tmp_path
