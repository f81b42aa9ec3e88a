"""The synthetic federations of the scaling benchmark: real data's shape, a valid leave-one-out split."""

from __future__ import annotations

import numpy as np

from gfmfr.data.synthetic import items_for, synthetic_dataset


def test_catalogue_grows_as_public_datasets_do():
    assert items_for(1000) == 1700
    assert 4500 < items_for(10_000) < 6000 and 45_000 < items_for(1_000_000) < 55_000


def test_a_synthetic_split_is_leave_one_out_with_long_tails_and_is_seeded():
    data = synthetic_dataset(3000, seed=3)
    counts = np.diff(data.train_indptr)
    assert data.n_users <= 3000 and len(counts) == data.n_users and (counts >= 1).all()
    assert (data.valid_items >= 0).all() and (data.test_items >= 0).all()
    for u in range(0, data.n_users, 97):  # held-out items are not among the user's training items
        train = set(data.user_train(u).tolist())
        assert data.valid_items[u] not in train and data.test_items[u] not in train
        assert data.valid_items[u] != data.test_items[u]
    assert np.percentile(counts, 99) > 5 * np.median(counts)  # lognormal activity: a long tail of users
    popularity = np.sort(np.bincount(data.train_items, minlength=data.n_items))[::-1]
    assert popularity[: data.n_items // 10].sum() > 0.3 * popularity.sum()  # Zipf: the head dominates
    again = synthetic_dataset(3000, seed=3)
    assert (again.train_items == data.train_items).all() and (again.test_items == data.test_items).all()
    assert data.item_features["text"].shape == (data.n_items, 512)
