"""Server aggregation: FedAvg over clients' uploads (docs/method.md, step 3).

A client's upload of a shared item table is implicit for the rows it did not use: those rows
are the broadcast global rows times the client's weight-decay factor. Weighted sums therefore
cost O(rows used), not O(clients x items), and give exactly the dense FedAvg result.
"""

from __future__ import annotations

import numpy as np
import torch

from gfmfr.federation.client import LocalUpdate, scatter_rows
from gfmfr.models.base import Params


def weighted_sums(update: LocalUpdate, global_shared: Params, weights: torch.Tensor) -> Params:
    """``sum_c weights[k, c] * upload_c`` for every shared parameter: [K, ...] per name.

    ``weights`` is [K, C] over the clients of ``update`` (K = 1 for FedAvg, K = G for group sums).
    """
    out: Params = {}
    w = weights.to(torch.float32)
    for name, stacked in update.shared.items():
        out[name] = torch.einsum("kc,c...->k...", w, stacked)
    owner = torch.from_numpy(update.row_client)
    item = torch.from_numpy(update.row_item)
    for name, rows in update.rows.items():
        g = global_shared[name]
        decay = update.decay[name]
        # sum_c w_c upload_c = g * (sum_c w_c decay_c - sum_{rows of item i} w_c decay_c) + sum_rows w_c row:
        # the broadcast part is a per-item scalar, so the rows are read once (no per-row delta)
        out[name] = torch.empty((w.shape[0], *g.shape))
        for k in range(w.shape[0]):
            row_w = w[k, owner]
            held = torch.bincount(item, weights=row_w * decay[owner], minlength=len(g)).to(g.dtype)
            out[name][k] = g * (w[k] @ decay - held).view(-1, *([1] * (g.dim() - 1)))
            uniform = bool((row_w == 1).all())
            scatter_rows(out[name][k], item, rows if uniform else row_w.view(-1, *([1] * (rows.dim() - 1))) * rows)
    return out


def group_sums(update: LocalUpdate, global_shared: Params, labels: np.ndarray, n_groups: int) -> Params:
    """Per-group sums of the uploads, [G, ...] per shared parameter: :func:`weighted_sums` with one-hot
    weights (``labels[c]`` the group of client c, -1 for none), in one pass over the rows instead of G."""
    lab = torch.from_numpy(np.asarray(labels, np.int64))
    grouped = torch.nonzero(lab >= 0).flatten()
    onehot = torch.zeros(n_groups, len(lab))
    onehot[lab[grouped], grouped] = 1.0
    out: Params = {name: torch.einsum("kc,c...->k...", onehot, stacked) for name, stacked in update.shared.items()}
    owner = torch.from_numpy(update.row_client)
    row_group = lab[owner]
    keep = row_group >= 0
    owner = owner[keep]
    for name, rows in update.rows.items():
        g = global_shared[name]
        n = len(g)
        decay = update.decay[name]
        slot = row_group[keep] * n + torch.from_numpy(update.row_item)[keep]  # row (group, item) of [G * n, ...]
        held = torch.bincount(slot, weights=decay[owner], minlength=n_groups * n).to(g.dtype).view(n_groups, n)
        # as in weighted_sums: the broadcast part is a per-(group, item) scalar times the global row
        total = (onehot @ decay.to(torch.float32)).to(g.dtype)
        sums = g[None] * (total[:, None] - held).view(n_groups, n, *([1] * (g.dim() - 1)))
        scatter_rows(sums.view(n_groups * n, *g.shape[1:]), slot, rows[keep])
        out[name] = sums
    return out


class FedAvg:
    """Plain or sample-weighted mean of the participants' shared parameters, over client chunks."""

    def __init__(self, weighted: bool = False):
        self.weighted = weighted
        self.sums: Params = {}
        self.total = 0.0
        self.trained_rows: dict[str, torch.Tensor] = {}
        """Per shared item table, bool [n_items]: rows some participant trained (for row-wise server optimisers)."""

    def client_weights(self, update: LocalUpdate) -> torch.Tensor:
        if self.weighted:
            return torch.from_numpy(update.num_samples.astype(np.float32))
        return torch.ones(len(update.users))

    def add(self, update: LocalUpdate, global_shared: Params) -> None:
        w = self.client_weights(update)
        sums = weighted_sums(update, global_shared, w[None])
        for name, value in sums.items():
            self.sums[name] = self.sums[name] + value[0] if name in self.sums else value[0]
        self.total += float(w.sum())
        used = torch.from_numpy(update.row_item)
        for name in update.rows:
            rows = self.trained_rows.setdefault(name, torch.zeros(len(global_shared[name]), dtype=torch.bool))
            rows[used] = True

    def result(self, global_shared: Params) -> Params:
        """The new global parameters (unchanged where nobody participated, and for constants)."""
        if self.total == 0:
            return dict(global_shared)
        return {name: self.sums[name] / self.total if name in self.sums else value
                for name, value in global_shared.items()}
