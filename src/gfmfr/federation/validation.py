"""Screening of client uploads before they are averaged (issue 17: bad uploads are rejected).

A client's upload is rejected when any value it sends is NaN or infinite, or when the norm of its
update per local step (its upload minus the parameters it started from, item tables whole: the rows
it did not train changed by weight decay only) is more than ``federation.reject_norm`` times the
median of the clients screened with it. Per step, because a heavy user takes more steps: on ML-100K
the largest honest ratio to the median was 13 in the first 8 rounds of the four base models (35
without the division), hence a default of 100, which still catches an update scaled by 1e3. A rejected client is left out of the average; its own private
state is its own business. The engine and the Flower server screen per-client uploads; a Flower
node screens its users before it sums them.
"""

from __future__ import annotations

import numpy as np
import torch

from gfmfr.config import FederationConfig
from gfmfr.federation.messages import LocalUpdate, Params


def update_norms(update: LocalUpdate, broadcast: Params) -> np.ndarray:
    """[C] L2 norm of each client's whole update (NaN where it sent a non-finite value)."""
    C = len(update.users)
    sq = torch.zeros(C, dtype=torch.float64)
    bad = torch.zeros(C, dtype=torch.bool)
    for name, value in update.shared.items():
        delta = (value - broadcast[name].expand_as(value)).reshape(C, -1).double()
        bad |= ~torch.isfinite(delta).all(1)
        sq += delta.pow(2).sum(1)
    owner = torch.from_numpy(update.row_client)
    for name, rows in update.rows.items():
        g = broadcast[name]
        start = g.index_select(0, torch.from_numpy(update.row_item)).double()
        delta = (rows.double() - start).reshape(len(rows), -1)
        bad.index_fill_(0, owner[~torch.isfinite(delta).all(1)], True)
        decay = update.decay[name].double()
        bad |= ~torch.isfinite(decay)
        # rows a client did not train moved by (decay - 1) times the broadcast row
        untouched = (g.double().pow(2).sum() - torch.zeros(C, dtype=torch.float64).index_add_(
            0, owner, start.reshape(len(rows), -1).pow(2).sum(1))).clamp_min(0)
        sq += torch.zeros(C, dtype=torch.float64).index_add_(0, owner, delta.pow(2).sum(1)) \
            + (decay - 1) ** 2 * untouched
    norms = sq.sqrt().numpy()
    norms[bad.numpy()] = np.nan
    return norms


def screen(update: LocalUpdate, broadcast: Params, cfg: FederationConfig) -> np.ndarray:
    """[C] bool: the clients whose uploads are kept (finite, and with ``cfg.reject_norm > 0`` an update
    norm per local step at most ``reject_norm`` times the median of the finite ones; all with None)."""
    reject_norm = cfg.reject_norm
    if reject_norm is None:
        return np.ones(len(update.users), bool)
    steps = cfg.local_epochs * -(-np.asarray(update.num_samples) // cfg.batch_size)
    norms = update_norms(update, broadcast) / np.maximum(steps, 1)
    keep = np.isfinite(norms)
    if reject_norm > 0 and keep.any():
        keep &= norms <= reject_norm * np.median(norms[keep])
    return keep


def surviving(users: np.ndarray, dropout: float, seed: int, round_: int) -> np.ndarray:
    """The sampled ``users`` that do not drop out of ``round_`` (each drops with probability ``dropout``,
    a pure function of the seed, the round and its place in the sorted sample)."""
    if not 0 <= dropout < 1:
        raise ValueError(f"federation.dropout must be in [0, 1), got {dropout}")
    if dropout == 0:
        return users
    return users[np.random.default_rng([seed, 11, round_]).random(len(users)) >= dropout]


def select(update: LocalUpdate, keep: np.ndarray) -> LocalUpdate:
    """The uploads of the clients where ``keep`` is true."""
    if keep.all():
        return update
    kept = np.flatnonzero(keep)
    position = np.full(len(keep), -1)
    position[kept] = np.arange(len(kept))
    rows = np.flatnonzero(keep[update.row_client])
    idx, ridx = torch.from_numpy(kept), torch.from_numpy(rows)
    return LocalUpdate(
        users=update.users[kept], shared={n: t.index_select(0, idx) for n, t in update.shared.items()},
        rows={n: t.index_select(0, ridx) for n, t in update.rows.items()},
        row_client=position[update.row_client[rows]], row_item=update.row_item[rows],
        decay={n: t.index_select(0, idx) for n, t in update.decay.items()},
        num_samples=update.num_samples[kept], loss=update.loss[kept],
        signatures=None if update.signatures is None else update.signatures.index_select(0, idx),
        metrics={k: v[kept] for k, v in update.metrics.items()},
    )
