"""Screening of client uploads before they are averaged: bad uploads are rejected.

A client's upload is rejected when any value it sends is NaN or infinite, or when the norm of its
update per local step (its upload minus the parameters it started from, item tables whole: the rows
it did not train changed by weight decay only) is more than ``federation.reject_norm`` times the
median of the clients screened with it. Per step, because a heavy user takes more steps, which keeps
honest clients within a small multiple of the median (the default of 100 leaves room for them and still
catches an update scaled by 1e3). A rejected client is left out of the average; its own private
state is its own business. The engine and the Flower server screen per-client uploads; a Flower
node screens its users before it sums them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from gfmfr.config import FederationConfig
from gfmfr.federation.messages import LocalUpdate, Params


def update_norms(update: LocalUpdate, broadcast: Params) -> np.ndarray:
    """[C] L2 norm of each client's whole update (NaN or infinite where it sent a non-finite value).

    One pass over the uploaded rows in float32 (a non-finite value carries into its row's norm); the
    rows a client did not train moved by ``(decay - 1)`` times the broadcast row, in closed form.
    """
    C = len(update.users)
    sq = torch.zeros(C, dtype=torch.float64)
    for name, value in update.shared.items():
        delta = value - broadcast[name].expand_as(value)
        sq += torch.linalg.vector_norm(delta.reshape(C, -1), dim=1).double() ** 2
    owner = torch.from_numpy(update.row_client)
    items = torch.from_numpy(update.row_item)
    for name, rows in update.rows.items():
        g = broadcast[name]
        delta = g.index_select(0, items).sub_(rows)  # the negated change: one temporary, not two
        row_sq = torch.linalg.vector_norm(delta.reshape(len(rows), -1), dim=1)
        g_sq = torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1).double() ** 2
        held_sq = torch.zeros(C, dtype=torch.float64).index_add_(0, owner, g_sq.index_select(0, items))
        decay = update.decay[name].double()
        sq += torch.zeros(C, dtype=torch.float64).index_add_(0, owner, row_sq.double() ** 2) + (decay - 1) ** 2 * (
            g_sq.sum() - held_sq
        ).clamp_min(0)
    return sq.sqrt().numpy()


def screen(update: LocalUpdate, broadcast: Params, cfg: FederationConfig) -> np.ndarray:
    """[C] bool: the clients whose uploads are kept (finite, and with ``cfg.reject_norm > 0`` an update
    norm per local step at most ``reject_norm`` times the median of the finite ones; all with None)."""
    reject_norm = cfg.reject_norm
    if reject_norm is None:
        return np.ones(len(update.users), bool)
    steps = cfg.local_epochs * -(-np.asarray(update.num_samples) // cfg.batch_size)
    norms = update_norms(update, broadcast) / np.maximum(steps, 1)  # non-finite: NaN or inf
    keep = np.isfinite(norms)
    if reject_norm > 0 and keep.any():
        keep &= norms <= reject_norm * np.median(norms[keep])
    return keep


def screening(cfg: FederationConfig, private: bool) -> FederationConfig:
    """The settings uploads are screened with: under DP (``private``) only non-finite uploads are
    rejected, since clipping bounds the rest and a rule relative to the round's median would make one
    client's fate depend on the other clients' data."""
    return replace(cfg, reject_norm=0.0) if private and cfg.reject_norm else cfg


def keep_screened(update: LocalUpdate, broadcast: Params, cfg: FederationConfig) -> tuple[LocalUpdate, int]:
    """``update`` less the uploads :func:`screen` rejects, and how many it rejected."""
    keep = screen(update, broadcast, cfg)
    if keep.all():
        return update, 0
    return LocalUpdate.concat([update], np.flatnonzero(keep)), int((~keep).sum())


def surviving(users: np.ndarray, dropout: float, seed: int, round_: int) -> np.ndarray:
    """The sampled ``users`` that do not drop out of ``round_`` (each drops with probability ``dropout``,
    a pure function of the seed, the round and its place in the sorted sample)."""
    if not 0 <= dropout < 1:
        raise ValueError(f"federation.dropout must be in [0, 1), got {dropout}")
    if dropout == 0:
        return users
    return users[np.random.default_rng([seed, 11, round_]).random(len(users)) >= dropout]
