"""The centralised upper bound: the same base model trained on all training data in one place.

No federation: one server holds every user's interactions and trains one copy of the model.
Every parameter the federated model declares is kept once (shared ones), per user (private
ones: user vectors, personal heads) or per user and item (FedRAP's D_u), initialised as the
federation initialises them. Each epoch draws fresh negatives (the same sampler and number as
the federation), shuffles all pairs across users, and takes Adam steps on minibatches of
them; the per-user and per-item rows use sparse Adam, so a step costs the rows it touches.
The model's forward, base loss and regulariser are used as they are, with each pair as a
one-item batch of its user (FedRAP's ramp follows the epoch). Model selection is the
federation's: validate every epoch, test at the best validation epoch, stop early
(``centralised.patience`` epochs after the best).

This is the accuracy a federation of the same model can at most approach: the item table
sees every gradient at once instead of an average of local updates.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gfmfr.config import RunConfig
from gfmfr.data.dataset import Dataset
from gfmfr.data.sampling import train_keys, training_negatives
from gfmfr.eval.evaluator import Evaluator
from gfmfr.eval.selection import BestRound
from gfmfr.federation.state import FederationState
from gfmfr.models.base import FederatedRecommender, Params

log = logging.getLogger(__name__)


class CentralParams:
    """Every parameter of ``model`` for all users at once: dense (shared) or row tables (sparse Adam)."""

    def __init__(self, model: FederatedRecommender, n_users: int, seed: int):
        self.model = model
        self.n_users, self.n_items = n_users, model.n_items
        self.kinds = k = model.kinds
        self.specs = k.specs
        init = FederationState(model, n_users, seed)
        # shared, not per item: [*shape]; public content: [n_items, *shape]
        self.dense = {n: init.shared[n].clone().requires_grad_() for n in k.shared_dense}
        self.constants = {n: init.shared[n] for n in k.constant_tables}
        # per item, per user, or per (user, item) (zero-initialised like the federation's): [rows, k]
        self.rows: dict[str, torch.Tensor] = {}
        self.rows.update(
            {n: init.shared[n].reshape(self.n_items, -1).clone().requires_grad_() for n in k.shared_tables}
        )
        self.rows.update({n: init.private[n].reshape(n_users, -1).clone().requires_grad_() for n in k.private_dense})
        self.rows.update(
            {
                n: torch.zeros(n_users * self.n_items, int(np.prod(self.specs[n].shape)), requires_grad=True)
                for n in k.private_tables
            }
        )

    def _row_index(self, name: str, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if name in self.kinds.shared_tables:
            return items
        return users * self.n_items + items if name in self.kinds.private_tables else users

    def batch(self, users: torch.Tensor, items: torch.Tensor) -> tuple[Params, Params]:
        """Per-pair parameters [A, ...] and item rows [A, 1, ...] for the pairs (users[a], items[a])."""
        p: Params = {}
        rows: Params = {}
        A = len(users)
        for name, spec in self.specs.items():
            if name in self.constants:
                rows[name] = self.constants[name][items].view(A, 1, *spec.shape)
            elif name in self.dense:
                p[name] = self.dense[name].expand(A, *spec.shape)
            else:
                value = F.embedding(self._row_index(name, users, items), self.rows[name], sparse=True)
                if name in self.kinds.tables:
                    rows[name] = value.view(A, 1, *spec.shape)
                else:
                    p[name] = value.view(A, *spec.shape)
        return p, rows

    @torch.no_grad()
    def score(self, users: np.ndarray) -> torch.Tensor:
        """Logits [U, n_items] of every item for ``users``."""
        idx = torch.from_numpy(users)
        U = len(users)
        p: Params = {}
        items: Params = {}
        for name, spec in self.specs.items():
            if name in self.constants:
                items[name] = self.constants[name].expand(U, *self.constants[name].shape)
            elif name in self.dense:
                p[name] = self.dense[name].expand(U, *spec.shape)
            elif name in self.kinds.shared_tables:
                table = self.rows[name].view(self.n_items, *spec.shape)
                items[name] = table.expand(U, *table.shape)
            elif name in self.kinds.private_tables:
                items[name] = self.rows[name].view(self.n_users, self.n_items, *spec.shape)[idx]
            else:
                p[name] = self.rows[name][idx].view(U, *spec.shape)
        return self.model.forward(p, items)


def train_centralised(dataset: Dataset, model: FederatedRecommender, cfg: RunConfig) -> dict[str, Any]:
    """Train ``model`` on all training pairs; best epoch on validation, test at that epoch."""
    cc, fed, ev = cfg.centralised, cfg.federation, cfg.eval
    params = CentralParams(model, dataset.n_users, cfg.seed)
    optimisers: list[torch.optim.Optimizer] = []
    if params.dense:
        optimisers.append(torch.optim.Adam(list(params.dense.values()), lr=cc.lr))
    if params.rows:
        optimisers.append(torch.optim.SparseAdam(list(params.rows.values()), lr=cc.lr))
    evaluator = Evaluator(dataset, cfg.eval, cfg.seed, cfg.runtime.eval_batch)
    keys = train_keys(dataset)
    all_users = np.arange(dataset.n_users)
    gen = torch.Generator().manual_seed(cfg.seed)
    best = BestRound(ev.select_metric, cc.patience)
    history: list[dict[str, Any]] = []
    for epoch in range(cc.epochs):
        t0 = time.perf_counter()
        neg_users, neg_items = training_negatives(dataset, all_users, fed.num_negatives, cfg.seed, epoch, keys)
        users = torch.from_numpy(np.concatenate([dataset.train_users, neg_users]))
        items = torch.from_numpy(np.concatenate([dataset.train_items, neg_items]))
        labels = torch.cat([torch.ones(len(dataset.train_items)), torch.zeros(len(neg_items))])
        order = torch.randperm(len(users), generator=gen)
        losses = []
        for idx in order.split(cc.batch_size):
            u, i, y = users[idx], items[idx], labels[idx]
            p, rows = params.batch(u, i)
            logits = model.forward(p, rows)
            loss = model.base_loss(p, rows, logits, y[:, None], torch.ones(len(idx), 1), epoch).mean()
            for opt in optimisers:
                opt.zero_grad()
            loss.backward()
            for opt in optimisers:
                opt.step()
            losses.append(float(loss.detach()))
        t1 = time.perf_counter()
        valid = evaluator.evaluate(params.score, "valid")
        entry: dict[str, Any] = {
            "round": epoch,
            "loss": float(np.mean(losses)),
            "valid": valid,
            "seconds": {"train": t1 - t0, "evaluate": time.perf_counter() - t1},
        }
        history.append(entry)
        if not np.isfinite(entry["loss"]):
            raise FloatingPointError(f"centralised training diverged in epoch {epoch}; lower centralised.lr")
        best.update(epoch, valid, lambda: evaluator.evaluate(params.score, "test"))
        log.info(
            "epoch %3d  loss %.4f  valid HR@10 %.4f NDCG@10 %.4f  (%.2fs train)",
            epoch,
            entry["loss"],
            valid.get("HR@10", float("nan")),
            valid.get("NDCG@10", float("nan")),
            t1 - t0,
        )
        if best.stop(epoch, "epoch"):
            break
    return {
        "best_round": best.round,
        "valid": best.valid,
        "test": best.test,
        "history": history,
        "seconds_per_round": float(np.mean([h["seconds"]["train"] for h in history])),
    }
