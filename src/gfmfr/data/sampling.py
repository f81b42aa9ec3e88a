"""Counter-based random numbers and negative sampling.

Every draw is a pure function of (seed, stream, round, user, position), so a client gets the
same negatives and the same minibatch order whether it trains alone (one client at a time, as
inside a Flower ClientApp) or batched with every other client of the round.
"""

from __future__ import annotations

import numpy as np

from gfmfr.data.dataset import Dataset

Key = np.ndarray | int | np.integer
"""A hash key: an integer or an array of them."""

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)

STREAM_NEGATIVES = 1
STREAM_SHUFFLE = 2
STREAM_EVAL_VALID = 3
STREAM_EVAL_TEST = 4
STREAM_INIT = 5
STREAM_VALID_USERS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hash_fold(state: Key, *keys: Key) -> np.ndarray:
    """Continue :func:`hash_u64` from ``state``: ``hash_fold(hash_u64(a, b), c) == hash_u64(a, b, c)``.

    A prefix shared by many elements (a user's) can be hashed once per user and gathered.
    """
    out = state
    with np.errstate(over="ignore"):
        for k in keys:
            out = _mix(np.asarray(out, dtype=np.uint64) + _GOLD + np.asarray(k).astype(np.uint64))
    return np.asarray(out, dtype=np.uint64)


def hash_u64(*keys: Key) -> np.ndarray:
    """A well-mixed uint64 per element of the broadcast ``keys``."""
    return hash_fold(np.uint64(0), *keys)


def to_unit(hashes: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) from uint64 hashes (their top 53 bits)."""
    return (hashes >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def uniform(*keys: np.ndarray | int) -> np.ndarray:
    """Floats in [0, 1) from :func:`hash_u64`."""
    return to_unit(hash_u64(*keys))


def sample_excluding(
    users: np.ndarray,
    slots: np.ndarray,
    n_items: int,
    exclude_keys: np.ndarray,
    seed: int,
    stream: int,
    round_: int,
    user_hash: np.ndarray | None = None,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """One item per (user, slot), uniform over items whose key ``user * n_items + item`` is not excluded.

    ``exclude_keys`` must be sorted. Rejected draws are redrawn with the next attempt counter.
    ``user_hash``, if given, is ``hash_u64(seed, stream, round_, users)`` (cheaper to compute per user).
    ``pool``, if given, are the only items drawn (the items training knows: the cold-items split).
    """
    size = np.uint64(n_items if pool is None else len(pool))
    prefix = hash_u64(seed, stream, round_, users) if user_hash is None else user_hash
    out = np.empty(len(users), dtype=np.int64)
    todo = np.arange(len(users))
    attempt = 0
    while len(todo):
        draw = (hash_fold(prefix[todo], slots[todo], attempt) % size).astype(np.int64)
        if pool is not None:
            draw = pool[draw]
        keys = users[todo] * n_items + draw
        pos = np.searchsorted(exclude_keys, keys)
        pos = np.minimum(pos, len(exclude_keys) - 1)
        hit = exclude_keys[pos] == keys if len(exclude_keys) else np.zeros(len(keys), bool)
        out[todo[~hit]] = draw[~hit]
        todo = todo[hit]
        attempt += 1
        if attempt > 10_000:
            raise RuntimeError("negative sampling did not converge: some user interacted with (nearly) every item")
    return out


def train_keys(dataset: Dataset) -> np.ndarray:
    """Sorted ``user * n_items + item`` keys of all training positives."""
    return np.sort(dataset.train_users * dataset.n_items + dataset.train_items)


def training_negatives(
    dataset: Dataset, users: np.ndarray, num_negatives: int, seed: int, round_: int, keys: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``num_negatives`` per training positive of each of ``users``, resampled every round.

    Returns (user, item) arrays grouped by user in the order of ``users``. Negatives avoid the
    user's training positives only: validation and test items stay unknown to training.
    """
    keys = train_keys(dataset) if keys is None else keys
    counts = dataset.train_counts[users] * num_negatives
    owner = np.repeat(users, counts)
    slot = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    user_hash = np.repeat(hash_u64(seed, STREAM_NEGATIVES, round_, users), counts)
    items = sample_excluding(
        owner, slot, dataset.n_items, keys, seed, STREAM_NEGATIVES, round_, user_hash, dataset.warm_items
    )
    return owner, items


def client_negatives(
    positives: np.ndarray,
    n_items: int,
    num_negatives: int,
    seed: int,
    client: int,
    round_: int,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """One client's ``num_negatives`` per training positive in ``round_``, from its own positives only
    (and ``pool``, the items training knows, if not all): the same items :func:`training_negatives`
    draws for it among every client."""
    keys = np.sort(client * n_items + np.asarray(positives, np.int64))
    n = len(positives) * num_negatives
    return sample_excluding(
        np.full(n, client, np.int64), np.arange(n), n_items, keys, seed, STREAM_NEGATIVES, round_, pool=pool
    )


def epoch_order(seed: int, client: int, round_: int, epoch: int, n: int) -> np.ndarray:
    """The order in which a client visits its ``n`` examples in one local epoch: a seeded permutation."""
    keys = to_unit(hash_fold(hash_u64(seed, STREAM_SHUFFLE, round_, np.uint64(client)), epoch, np.arange(n)))
    return np.argsort(keys)


def eval_negatives(dataset: Dataset, split: str, n: int, seed: int) -> np.ndarray:
    """``n`` distinct sampled negatives per user for the sampled protocol: [n_users, n].

    They avoid every item the user interacted with (train, validation and test); validation and
    test use separate streams. Drawn as the ``n`` smallest random keys among allowed items.
    """
    stream = STREAM_EVAL_VALID if split == "valid" else STREAM_EVAL_TEST
    out = np.empty((dataset.n_users, n), dtype=np.int64)
    items = np.arange(dataset.n_items)
    for start in range(0, dataset.n_users, 1024):
        users = np.arange(start, min(start + 1024, dataset.n_users))
        keys = uniform(seed, stream, users[:, None], items[None, :])
        rows = np.repeat(users - start, np.diff(dataset.train_indptr)[users])
        keys[rows, np.concatenate([dataset.user_train(int(u)) for u in users])] = np.inf
        keys[users - start, dataset.valid_items[users]] = np.inf
        keys[users - start, dataset.test_items[users]] = np.inf
        if (np.isfinite(keys).sum(1) < n).any():
            raise ValueError(f"some user has fewer than {n} non-interacted items for sampled evaluation")
        out[users - start] = np.argpartition(keys, n - 1, axis=1)[:, :n]
    return out
