"""Leave-one-out evaluation of any model that scores a batch of users against all items."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gfmfr.config import EvalConfig
from gfmfr.data.dataset import Dataset
from gfmfr.data.sampling import STREAM_VALID_USERS, eval_negatives, uniform
from gfmfr.eval.metrics import metrics_from_ranks, pessimistic_ranks

ScoreFn = Callable[[np.ndarray], torch.Tensor]
"""Maps user indices [U] to scores [U, n_items] (higher is better)."""


class Evaluator:
    """Ranks each user's held-out item; full ranking masks the user's training items.

    Full ranking: candidates are every item the user never interacted with in training
    (docs/method.md), so at test time the validation item is a candidate too. Sampled: the target
    against ``cfg.sampled_negatives`` items the user never interacted with at all, drawn
    separately for validation and test.

    On the cold-items split (``dataset.cold_items``) only users with a held-out item count, and the
    candidates are the cold items (the plain keys, ``NDCG@10``) and, as a second protocol, every item
    not in the user's training data (``all NDCG@10``; :meth:`evaluate` with ``all_items = False``
    leaves it out for a scorer of the cold items alone).
    """

    def __init__(
        self,
        dataset: Dataset,
        cfg: EvalConfig,
        seed: int = 0,
        user_batch: int = 256,
        item_counts: np.ndarray | None = None,
    ):
        if cfg.protocol not in ("full", "sampled"):
            raise ValueError(f"eval.protocol must be 'full' or 'sampled', got {cfg.protocol!r}")
        self.dataset = dataset
        self.cfg = cfg
        self.user_batch = user_batch
        self.item_counts = (
            np.bincount(dataset.train_items, minlength=dataset.n_items) if item_counts is None else item_counts
        )
        """Training interactions per item over the whole federation (the long-tail slice's definition,
        part of the protocol: a node that holds only its users' data is given it)."""
        self.cold: torch.Tensor | None = None
        """[n_items] bool, True at the cold items (the cold-items split), else None."""
        if dataset.cold_items is not None:
            self.cold = torch.zeros(dataset.n_items, dtype=torch.bool)
            self.cold[torch.from_numpy(dataset.cold_items)] = True
        if cfg.valid_users is not None and cfg.valid_users < 1:
            raise ValueError(f"eval.valid_users must be at least 1 (or None: every user), got {cfg.valid_users}")
        self.validating: np.ndarray | None = None
        """[n_users] bool: the users validation ranks (None: every user), ``eval.valid_users``."""
        if cfg.valid_users is not None and cfg.valid_users < dataset.n_users:
            share = cfg.valid_users / dataset.n_users
            self.validating = uniform(seed, STREAM_VALID_USERS, np.arange(dataset.n_users)) < share
        self.negatives: dict[str, np.ndarray] = {}
        if cfg.protocol == "sampled":
            for split in ("valid", "test"):
                self.negatives[split] = eval_negatives(dataset, split, cfg.sampled_negatives, seed)

    def train_mask(self, users: np.ndarray) -> torch.Tensor:
        """[U, n_items] bool, True at the users' training items."""
        d = self.dataset
        counts = np.diff(d.train_indptr)[users]
        rows = np.repeat(np.arange(len(users)), counts)
        cols = np.concatenate([d.user_train(u) for u in users]) if len(users) else np.empty(0, np.int64)
        mask = torch.zeros(len(users), d.n_items, dtype=torch.bool)
        mask[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        return mask

    def evaluated_users(self, split: str) -> np.ndarray:
        """The users with a held-out item in ``split`` (every user, but on the cold-items split); for
        validation, those of them in the ``eval.valid_users`` sample."""
        targets = self.dataset.valid_items if split == "valid" else self.dataset.test_items
        if split == "valid" and self.validating is not None:
            return np.flatnonzero((targets >= 0) & self.validating)
        return np.flatnonzero(targets >= 0)

    def ranks(
        self, score_fn: ScoreFn, split: str, users: np.ndarray | None = None, all_items: bool = False
    ) -> torch.Tensor:
        """Rank of the held-out item of every evaluated user (or of ``users``), [U]; on the cold-items
        split among the cold items, or with ``all_items`` among every item (both: [2, U])."""
        d = self.dataset
        targets = d.valid_items if split == "valid" else d.test_items
        everyone = self.evaluated_users(split) if users is None else np.asarray(users, np.int64)
        out = [torch.zeros((2, 0) if all_items else 0, dtype=torch.long)]
        for start in range(0, len(everyone), self.user_batch):
            users = everyone[start : start + self.user_batch]
            with torch.no_grad():
                scores = score_fn(users).float()
            target = torch.from_numpy(targets[users])
            if self.cfg.protocol == "full":
                candidates = ~self.train_mask(users)
                ranks = pessimistic_ranks(scores, target, candidates if self.cold is None else self.cold[None])
                if all_items:
                    ranks = torch.stack([ranks, pessimistic_ranks(scores, target, candidates)])
                out.append(ranks)
            else:
                cols = torch.from_numpy(np.concatenate([targets[users, None], self.negatives[split][users]], 1))
                out.append(pessimistic_ranks(scores.gather(1, cols), torch.zeros(len(users), dtype=torch.long)))
        return torch.cat(out, -1)

    def evaluate(self, score_fn: ScoreFn, split: str, all_items: bool = True) -> dict[str, float]:
        """HR/NDCG/Recall/MRR at every K of the config on ``split`` (``valid`` or ``test``); on the
        cold-items split among the cold items, and with ``all_items`` among every item too (``all ...``)."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        if self.cold is not None:
            ranks = self.ranks(score_fn, split, all_items=all_items)
            if not all_items:
                return metrics_from_ranks(ranks, self.cfg.ks)
            out = metrics_from_ranks(ranks[0], self.cfg.ks)
            out.update({f"all {k}": v for k, v in metrics_from_ranks(ranks[1], self.cfg.ks).items()})
            return out
        ranks = self.ranks(score_fn, split)
        out = metrics_from_ranks(ranks, self.cfg.ks)
        if self.cfg.tail_max_count:
            tail = torch.from_numpy(self.tail_users(split)[self.evaluated_users(split)])
            out["tail users"] = float(tail.sum())
            if tail.any():
                out.update({f"tail {k}": v for k, v in metrics_from_ranks(ranks[tail], self.cfg.ks).items()})
        return out

    def sums(self, score_fn: ScoreFn, split: str, users: np.ndarray) -> dict[str, float]:
        """The metrics of ``users`` as sums over them, with their count ``users`` (and ``tail users``):
        what a node reports, so that the server's :func:`metrics_from_sums` over every node's sums is
        :meth:`evaluate` over every user (full ranking is per user). Users without a held-out item in
        ``split`` are left out, as :meth:`evaluate` leaves them out."""
        targets = self.dataset.valid_items if split == "valid" else self.dataset.test_items
        users = np.asarray(users, np.int64)
        kept = targets[users] >= 0
        if split == "valid" and self.validating is not None:
            kept &= self.validating[users]
        users = users[kept]
        ranks = self.ranks(score_fn, split, users)
        out = {k: v * len(users) for k, v in metrics_from_ranks(ranks, self.cfg.ks).items()} if len(users) else {}
        out["users"] = float(len(users))
        if self.cfg.tail_max_count:
            tail = torch.from_numpy(self.tail_users(split)[users])
            out["tail users"] = float(tail.sum())
            if tail.any():
                out.update(
                    {
                        f"tail {k}": v * float(tail.sum())
                        for k, v in metrics_from_ranks(ranks[tail], self.cfg.ks).items()
                    }
                )
        return out

    def tail_users(self, split: str) -> np.ndarray:
        """[n_users] bool: the user has a held-out item with at most ``tail_max_count`` training interactions."""
        d = self.dataset
        targets = d.valid_items if split == "valid" else d.test_items
        return (targets >= 0) & (self.item_counts[targets] <= self.cfg.tail_max_count)


def metrics_from_sums(parts: list[dict[str, float]]) -> dict[str, float]:
    """Means over every user from per-node :meth:`Evaluator.sums` (the keys of :meth:`Evaluator.evaluate`)."""
    total: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    n, tail = total.pop("users"), total.get("tail users", 0.0)
    return {k: v if k == "tail users" else v / (tail if k.startswith("tail ") else n) for k, v in total.items()}
