import numpy as np

from gfmfr.data.sampling import eval_negatives, train_keys, training_negatives


def test_training_negatives_avoid_positives_and_are_per_user(planted):
    users = np.arange(planted.n_users)
    owner, items = training_negatives(planted, users, 4, seed=1, round_=0)
    assert len(items) == 4 * len(planted.train_items)
    keys = set((planted.train_users * planted.n_items + planted.train_items).tolist())
    assert not (set((owner * planted.n_items + items).tolist()) & keys)
    # the same user gets the same negatives whoever else is sampled with it
    o2, i2 = training_negatives(planted, np.array([5, 3]), 4, seed=1, round_=0)
    np.testing.assert_array_equal(i2[o2 == 3], items[owner == 3])
    # and new ones next round
    _, i3 = training_negatives(planted, np.array([3]), 4, seed=1, round_=1)
    assert not np.array_equal(i3, items[owner == 3])
    # resampling covers most of the catalogue over rounds (the reference reuses the lowest ids)
    seen = set()
    for r in range(5):
        seen |= set(training_negatives(planted, users, 4, 1, r, train_keys(planted))[1].tolist())
    assert len(seen) == planted.n_items


def test_eval_negatives_distinct_unseen_and_split_specific(planted):
    v = eval_negatives(planted, "valid", 20, seed=0)
    t = eval_negatives(planted, "test", 20, seed=0)
    assert v.shape == (planted.n_users, 20)
    assert not np.array_equal(v, t)
    for u in range(planted.n_users):
        seen = set(planted.user_train(u).tolist()) | {planted.valid_items[u], planted.test_items[u]}
        assert len(set(v[u].tolist())) == 20 and not (set(v[u].tolist()) & seen)


def test_hash_fold_continues_hash_u64_from_a_gathered_prefix():
    from gfmfr.data.sampling import hash_fold, hash_u64

    users = np.array([5, 0, 9])
    owner = np.array([0, 0, 1, 2, 2, 2])
    j = np.arange(6)
    direct = hash_u64(7, 2, 3, users[owner], 4, j)
    folded = hash_fold(hash_fold(hash_u64(7, 2, 3, users), 4)[owner], j)
    np.testing.assert_array_equal(folded, direct)
    assert not np.array_equal(hash_u64(7, 2, 3, users[owner], 5, j), direct)
