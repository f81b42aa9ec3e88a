"""Preprocessing (binarise, de-duplicate, k-core, re-index) and the split: the source's own
(``split_label``), leave-one-out by time, or cold items.

Every row that does not reach the split is counted in :attr:`Dataset.report` under a reason.
Duplicate policy: a (user, item) pair seen more than once keeps its earliest interaction
(by timestamp, ties by file order) and the others are counted as ``duplicate_pair``; with
``duplicates = "error"`` the first repeat raises a :class:`DataError` naming its line.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gfmfr.config import DataConfig
from gfmfr.data.errors import DataError
from gfmfr.data.ml100k import load_ml100k
from gfmfr.data.sources import RawData, RawItems, read_folder, read_items_csv

log = logging.getLogger(__name__)

MIN_INTERACTIONS = 3
"""Leave-one-out needs a training, a validation and a test interaction."""


@dataclass
class Dataset:
    """A leave-one-out split with contiguous ids; training positives stored as CSR by user."""

    name: str
    n_users: int
    n_items: int
    train_indptr: np.ndarray
    """CSR row pointer over users into :attr:`train_items` (length n_users + 1)."""
    train_items: np.ndarray
    """Training positives, grouped by user, each user's in chronological order."""
    valid_items: np.ndarray
    """Second-latest item of each user."""
    test_items: np.ndarray
    """Latest item of each user."""
    user_ids: np.ndarray
    """Source user id of each contiguous user index."""
    item_ids: np.ndarray
    """Source item id of each contiguous item index."""
    item_text: list[str | None] | None = None
    """Item descriptions aligned with the item index, if any."""
    item_image: list[Path | None] | None = None
    """Item image paths aligned with the item index, if any."""
    item_features: dict[str, np.ndarray] = field(default_factory=dict)
    """Precomputed content features per modality aligned with the item index."""
    features_from: str = "precomputed"
    """Which content a modality with both a feature file and raw content uses (``data.features``)."""
    report: dict[str, Any] = field(default_factory=dict)
    """Counts after preprocessing, split sizes and ``dropped`` (reason -> count)."""
    cold_items: np.ndarray | None = None
    """The ``cold-items`` split's held-out items (sorted indices): never in training, never drawn as
    negatives; validation and test items are among them (-1 for a user without one). None otherwise."""

    @functools.cached_property
    def warm_items(self) -> np.ndarray | None:
        """The items training knows (sorted), or None when every item is (the leave-one-out split):
        the pool negatives are drawn from."""
        if self.cold_items is None:
            return None
        return np.setdiff1d(np.arange(self.n_items), self.cold_items)

    @property
    def train_users(self) -> np.ndarray:
        """The user index of every training positive (parallel to :attr:`train_items`)."""
        return np.repeat(np.arange(self.n_users), np.diff(self.train_indptr))

    @property
    def train_counts(self) -> np.ndarray:
        """Training positives per user."""
        return np.diff(self.train_indptr)

    def only_users(self, users: np.ndarray) -> Dataset:
        """What a node hosting ``users`` holds: their interactions only. Ids and sizes are unchanged;
        every other user has no training positives and no held-out items (-1)."""
        keep = np.zeros(self.n_users, bool)
        keep[np.asarray(users, np.int64)] = True
        counts = np.where(keep, self.train_counts, 0)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        items = self.train_items[np.repeat(keep, self.train_counts)]
        out = copy.copy(self)
        out.train_indptr, out.train_items = indptr, items
        out.valid_items = np.where(keep, self.valid_items, -1)
        out.test_items = np.where(keep, self.test_items, -1)
        return out

    def user_train(self, user: int) -> np.ndarray:
        """Training positives of one user."""
        return self.train_items[self.train_indptr[user] : self.train_indptr[user + 1]]


def _drop_duplicates(frame: pd.DataFrame, policy: str, source: str, dropped: dict[str, int]) -> pd.DataFrame:
    ordered = frame.sort_values(["timestamp", "line"], kind="stable", na_position="last")
    dup = ordered.duplicated(["user_id", "item_id"], keep="first")
    if dup.any():
        if policy == "error":
            row = ordered[dup].sort_values("line").iloc[0]
            raise DataError(
                source,
                f"repeated (user, item) pair ({row.user_id}, {row.item_id})",
                line=int(row.line),
                field="item_id",
            )
        if policy != "first":
            raise ValueError(f"data.duplicates must be 'first' or 'error', got {policy!r}")
        dropped["duplicate_pair"] = int(dup.sum())
    return ordered[~dup].sort_values("line", kind="stable")


def _kcore(frame: pd.DataFrame, k: int, dropped: dict[str, int]) -> pd.DataFrame:
    before = len(frame)
    while k > 0:
        users = frame.groupby("user_id")["item_id"].transform("size")
        items = frame.groupby("item_id")["user_id"].transform("size")
        keep = (users >= k) & (items >= k)
        if keep.all():
            break
        frame = frame[keep]
    if before - len(frame):
        dropped["kcore"] = before - len(frame)
    return frame


def _check_items(frame: pd.DataFrame, items: RawItems, source: str) -> None:
    known = pd.Index(items.item_ids)
    unknown = ~frame["item_id"].isin(known)
    if unknown.any():
        row = frame[unknown].iloc[0]
        raise DataError(
            source,
            f"item {row.item_id!r} is not in {items.source} ({int(unknown.sum())} such rows)",
            line=int(row.line),
            field="item_id",
        )


def build_dataset(raw: RawData, cfg: DataConfig, name: str = "", items: RawItems | None = None) -> Dataset:
    """Preprocess ``raw`` and split it (``cfg.split``): by the source's ``split_label`` or leave-one-out by
    timestamp (stable: ties keep file order), or into cold items."""
    frame = raw.interactions
    dropped: dict[str, int] = {}
    items = items if items is not None else raw.items
    if items is not None:
        _check_items(frame, items, raw.source)
    read_rows = len(frame)

    if cfg.rating_threshold is not None:
        keep = frame["rating"] >= cfg.rating_threshold
        dropped["below_rating_threshold"] = int((~keep).sum())
        frame = frame[keep]
    frame = _drop_duplicates(frame, cfg.duplicates, raw.source, dropped)
    frame = _kcore(frame, cfg.kcore, dropped)
    labelled = cfg.split == "auto" and "split_label" in frame.columns
    if labelled:  # a user needs one training interaction; the held-out ones are the source's
        short = ~frame["split_label"].eq(0).groupby(frame["user_id"]).transform("any")
        reason = "users_without_training_interactions"
    else:
        short = frame.groupby("user_id")["item_id"].transform("size") < MIN_INTERACTIONS
        reason = "users_with_fewer_than_3"
    if short.any():
        dropped[f"interactions_of_{reason}"] = int(short.sum())
        dropped[reason] = int(frame.loc[short, "user_id"].nunique())
        frame = frame[~short]
    if frame.empty:
        raise DataError(raw.source, "no interactions left after preprocessing")

    user_ids, user_idx = np.unique(frame["user_id"].to_numpy(), return_inverse=True)
    item_keys = frame["item_id"].to_numpy()
    item_ids, item_idx = _item_index(item_keys)
    ts = frame["timestamp"].to_numpy()
    line = frame["line"].to_numpy()
    # chronological per user; timestamp ties (or no timestamps) keep the source order
    order = np.lexsort((line, np.nan_to_num(ts, nan=-np.inf), user_idx))
    users = user_idx[order]
    seq = item_idx[order]
    n_users = len(user_ids)
    counts = np.bincount(users, minlength=n_users)
    ends = np.cumsum(counts)
    cold_items = None
    if cfg.split == "cold-items":
        cold_items, test, valid, in_train = _cold_split(users, seq, len(item_ids), n_users, cfg, dropped)
        n_train = np.bincount(users[in_train], minlength=n_users)
        if (n_train == 0).any():
            bad = int(np.flatnonzero(n_train == 0)[0])
            raise DataError(
                raw.source,
                f"user {user_ids[bad]!r} has only cold items: nothing left to train on "
                f"(lower data.cold_item_fraction or filter users)",
            )
    elif labelled:
        valid, test, in_train = _given_split(
            users, seq, frame["split_label"].to_numpy()[order], line[order], n_users, user_ids, raw.source
        )
        n_train = np.bincount(users[in_train], minlength=n_users)
    else:
        test = seq[ends - 1]
        valid = seq[ends - 2]
        in_train = np.ones(len(seq), dtype=bool)
        in_train[ends - 1] = False
        in_train[ends - 2] = False
        n_train = counts - 2
    train_items = seq[in_train].astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(n_train)]).astype(np.int64)

    dataset = Dataset(
        name=name or raw.source,
        n_users=n_users,
        n_items=len(item_ids),
        train_indptr=indptr,
        train_items=train_items,
        valid_items=valid.astype(np.int64),
        test_items=test.astype(np.int64),
        user_ids=user_ids,
        item_ids=item_ids,
        cold_items=cold_items,
    )
    if items is not None:
        _attach_items(dataset, items)
    dataset.report = {
        "dataset": dataset.name,
        "rows_read": read_rows,
        "users": n_users,
        "items": len(item_ids),
        "interactions": int(len(seq)),
        "train": int(len(train_items)),
        "valid": int((dataset.valid_items >= 0).sum()),
        "test": int((dataset.test_items >= 0).sum()),
        "density": float(len(seq) / (n_users * len(item_ids))),
        "dropped": dropped,
    }
    dataset.report["split"] = "split_label" if labelled else cfg.split.replace("auto", "leave-one-out")
    if cold_items is not None:
        dataset.report["cold_items"] = len(cold_items)
    if items is not None:
        dataset.report["catalogue_items_without_interactions"] = len(set(items.item_ids) - set(item_ids.tolist()))
    return dataset


def _cold_split(
    users: np.ndarray, seq: np.ndarray, n_items: int, n_users: int, cfg: DataConfig, dropped: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``cold-items`` split of the chronological (``users``, ``seq``) interactions: the cold items
    (a seeded ``cold_item_fraction`` of them), each user's latest and second-latest cold interaction
    (test and validation, -1 if none) and which interactions train (those with warm items)."""
    n_cold = max(1, int(round(cfg.cold_item_fraction * n_items)))
    rng = np.random.default_rng([cfg.split_seed, 11])
    cold_items = np.sort(rng.choice(n_items, size=n_cold, replace=False))
    is_cold = np.isin(seq, cold_items)
    in_train = ~is_cold
    # each user's cold interactions in time order: the last is the test, the one before it validation
    cold_pos = np.flatnonzero(is_cold)
    owner = users[cold_pos]
    n_cold_of = np.bincount(owner, minlength=n_users)
    last = np.cumsum(n_cold_of) - 1
    test = np.full(n_users, -1, np.int64)
    valid = np.full(n_users, -1, np.int64)
    has = n_cold_of >= 1
    test[has] = seq[cold_pos[last[has]]]
    two = n_cold_of >= 2
    valid[two] = seq[cold_pos[last[two] - 1]]
    dropped["interactions_with_cold_items"] = int(is_cold.sum())
    return cold_items, test, valid, in_train


def _given_split(
    users: np.ndarray,
    seq: np.ndarray,
    labels: np.ndarray,
    lines: np.ndarray,
    n_users: int,
    user_ids: np.ndarray,
    source: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The split the source gives (``split_label``) of the chronological (``users``, ``seq``) interactions:
    each user's validation and test item (-1 where the source has none left, e.g. a held-out repeat of
    a training item removed as a duplicate) and which interactions train. A second held-out row of one
    kind for a user is an error naming its line."""
    held = {}
    for label, name in ((1, "validation"), (2, "test")):
        rows = np.flatnonzero(labels == label)
        owners = users[rows]
        again = np.flatnonzero(owners[1:] == owners[:-1])  # rows are grouped by user
        if len(again):
            row = rows[again[0] + 1]
            raise DataError(
                source,
                f"user {user_ids[users[row]]!r} has a second {name} interaction",
                line=int(lines[row]),
                field="split_label",
            )
        items = np.full(n_users, -1, np.int64)
        items[owners] = seq[rows]
        held[name] = items
    return held["validation"], held["test"], labels == 0


def _item_index(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous item index; numeric ids are ordered numerically, others lexically."""
    uniq, inv = np.unique(keys, return_inverse=True)
    numeric = pd.to_numeric(pd.Series(uniq), errors="coerce")
    if not numeric.isna().any():
        order = np.argsort(numeric.to_numpy(), kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return uniq[order], rank[inv]
    return uniq, inv


def _attach_items(dataset: Dataset, items: RawItems) -> None:
    pos = pd.Index(items.item_ids).get_indexer(dataset.item_ids)
    if items.text is not None:
        dataset.item_text = [items.text[p] for p in pos]
    if items.image is not None:
        dataset.item_image = [items.image[p] for p in pos]
    dataset.item_features = {m: f[pos] for m, f in items.features.items()}


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read, preprocess and split the dataset that ``cfg`` names, adding ``cfg.content`` if given."""
    if cfg.dataset == "ml-100k":
        raw, name = load_ml100k(), "ml-100k"
    else:
        raw, name = read_folder(cfg.dataset), Path(cfg.dataset).name
    items = None
    if cfg.content is not None:
        content = Path(cfg.content)
        items = read_items_csv(content / "items.csv", content)
    dataset = build_dataset(raw, cfg, name=name, items=items)
    dataset.features_from = cfg.features
    if dataset.item_image is not None:
        missing = sum(1 for p in dataset.item_image if p is not None and not p.exists())
        dataset.report["items_without_image"] = sum(1 for p in dataset.item_image if p is None)
        dataset.report["image_files_missing"] = missing
        if missing:
            log.warning("%d image files named in items.csv do not exist; those items have no image", missing)
    if dataset.item_text is not None:
        dataset.report["items_without_text"] = sum(1 for t in dataset.item_text if t is None)
    return dataset
