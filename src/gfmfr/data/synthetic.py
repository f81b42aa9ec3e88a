"""Synthetic federations with real data's shape, at any size: for speed and memory benchmarks.

Users' activity is lognormal (most users have a handful of interactions, a few have hundreds), item
popularity follows a Zipf law over a random order of the items, and each item carries a random
content vector per modality. Each user's interactions come in a random order, split leave-one-out
(the last is test, the one before validation). Built directly as arrays, so a million users take
seconds; nothing here is meant to be learnable.
"""

from __future__ import annotations

import numpy as np

from gfmfr.data.dataset import MIN_INTERACTIONS, Dataset


def items_for(n_users: int) -> int:
    """A catalogue size that grows with the federation as public datasets' do: about 1,700 items for
    1,000 users (ML-100K), 5,000 for 10,000, 16,000 for 100,000 and 50,000 for a million."""
    return int(round(1700 * (n_users / 1000) ** 0.49))


def synthetic_dataset(
    n_users: int,
    n_items: int | None = None,
    seed: int = 0,
    median_activity: float = 20.0,
    activity_sigma: float = 1.0,
    zipf: float = 0.9,
    content_dim: int = 512,
    modalities: tuple[str, ...] = ("text",),
) -> Dataset:
    """``n_users`` users over ``n_items`` items (default :func:`items_for`), split leave-one-out."""
    n_items = n_items if n_items is not None else items_for(n_users)
    rng = np.random.default_rng([seed, 42])
    activity = rng.lognormal(np.log(median_activity), activity_sigma, n_users)
    counts = np.clip(activity.round().astype(np.int64), MIN_INTERACTIONS + 2, n_items // 2)
    popularity = 1.0 / np.arange(1, n_items + 1) ** zipf
    cdf = np.cumsum(popularity[rng.permutation(n_items)])
    users = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    items = np.searchsorted(cdf, rng.random(len(users)) * cdf[-1]).clip(max=n_items - 1)
    # a user's repeats of an item count once (its first); the rest keep their random order
    _, first = np.unique(users * n_items + items, return_index=True)
    first.sort()
    users, items = users[first], items[first]
    counts = np.bincount(users, minlength=n_users)
    keep = counts >= MIN_INTERACTIONS
    if not keep.all():  # too few distinct items left: leave the user out, renumbering the rest
        kept = keep[users]
        users, items = np.cumsum(keep)[users[kept]] - 1, items[kept]
        counts = counts[keep]
    n = len(counts)
    ends = np.cumsum(counts)
    test, valid = items[ends - 1], items[ends - 2]
    in_train = np.ones(len(items), bool)
    in_train[ends - 1] = in_train[ends - 2] = False
    indptr = np.concatenate([[0], np.cumsum(counts - 2)]).astype(np.int64)
    features = {m: rng.standard_normal((n_items, content_dim), dtype=np.float32) for m in modalities}
    return Dataset(
        name=f"synthetic-{n}x{n_items}",
        n_users=n,
        n_items=n_items,
        train_indptr=indptr,
        train_items=items[in_train].astype(np.int64),
        valid_items=valid.astype(np.int64),
        test_items=test.astype(np.int64),
        user_ids=np.arange(n).astype(str),
        item_ids=np.arange(n_items).astype(str),
        item_features=features,
        report={"dataset": "synthetic", "users": n, "items": n_items, "interactions": int(len(items))},
    )
