"""Server aggregation: FedAvg over clients' uploads (docs/method.md, step 3), and the server's side
of a round around it (:class:`RoundAggregate`).

A client's upload of a shared item table is implicit for the rows it did not use: those rows
are the broadcast global rows times the client's weight-decay factor. Weighted sums therefore
cost O(rows used), not O(clients x items), and give exactly the dense FedAvg result.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from gfmfr.config import FederationConfig
from gfmfr.federation.fast import scatter_rows
from gfmfr.federation.messages import LocalUpdate
from gfmfr.federation.plugin import Plugin
from gfmfr.federation.server_steps import ServerOptimizer
from gfmfr.federation.validation import keep_screened, screening
from gfmfr.models.base import Params
from gfmfr.privacy.dp import CentralNoise, clip_updates

log = logging.getLogger(__name__)


def group_sums(
    update: LocalUpdate, global_shared: Params, labels: np.ndarray, n_groups: int, weights: torch.Tensor | None = None
) -> Params:
    """``sum over the clients c of group k of weights[c] * upload_c``, [G, ...] per shared parameter.

    ``labels[c]`` is client c's group (-1: in none), ``weights`` [C] its weight (default 1). FedAvg is
    the one-group case; GFMFR's group targets use G groups. One pass over the uploaded rows.
    """
    lab = torch.from_numpy(np.asarray(labels, np.int64))
    w = torch.ones(len(lab)) if weights is None else weights.to(torch.float32)
    grouped = torch.nonzero(lab >= 0).flatten()
    member = torch.zeros(n_groups, len(lab))  # [G, C]: client c's weight in its group
    member[lab[grouped], grouped] = w[grouped]
    out: Params = {name: torch.einsum("kc,c...->k...", member, stacked) for name, stacked in update.shared.items()}
    owner = torch.from_numpy(update.row_client)
    row_item = torch.from_numpy(update.row_item)
    keep = lab[owner] >= 0
    everyone = bool(keep.all())  # FedAvg: no copy of the rows
    if not everyone:
        owner, row_item = owner[keep], row_item[keep]
    for name, rows in update.rows.items():
        g = global_shared[name]
        n = len(g)
        decay = update.decay[name]
        slot = lab[owner] * n + row_item  # row (group, item) of [G * n, ...]
        # sum_c w_c upload_c = g * (sum_c w_c decay_c - sum_{rows of item i} w_c decay_c) + sum_rows w_c row:
        # the broadcast part is a per-(group, item) scalar, so the rows are read once (no per-row delta)
        held = torch.bincount(slot, weights=w[owner] * decay[owner], minlength=n_groups * n).to(g.dtype)
        total = (member @ decay.to(torch.float32)).to(g.dtype)
        sums = g[None] * (total[:, None] - held.view(n_groups, n)).view(n_groups, n, *([1] * (g.dim() - 1)))
        kept = rows if everyone else rows[keep]
        if weights is not None:
            kept = w[owner].view(-1, *([1] * (rows.dim() - 1))) * kept
        scatter_rows(sums.view(n_groups * n, *g.shape[1:]), slot, kept)
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
        sums = group_sums(update, global_shared, np.zeros(len(update.users), np.int64), 1, w if self.weighted else None)
        used = torch.from_numpy(update.row_item)
        trained = {}
        for name in update.rows:
            trained[name] = torch.zeros(len(global_shared[name]), dtype=torch.bool)
            trained[name][used] = True
        self.add_sums({n: v[0] for n, v in sums.items()}, float(w.sum()), trained)

    def add_sums(self, sums: Params, total: float, trained_rows: dict[str, torch.Tensor]) -> None:
        """Fold in a partial aggregate: the weighted sums of some clients' uploads, their total weight,
        and the item rows any of them trained (what a node sends in place of its clients' uploads)."""
        for name, value in sums.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.total += total
        for name, rows in trained_rows.items():
            mine = self.trained_rows.setdefault(name, torch.zeros(len(rows), dtype=torch.bool))
            mine |= rows

    def result(self, global_shared: Params) -> Params:
        """The new global parameters (unchanged where nobody participated, and for constants)."""
        if self.total == 0:
            return dict(global_shared)
        return {
            name: self.sums[name] / self.total if name in self.sums else value for name, value in global_shared.items()
        }


class RoundAggregate:
    """The server's side of one round, in process and on Flower alike.

    Each chunk of per-client uploads is screened (:mod:`gfmfr.federation.validation`), folded into
    FedAvg and shown to the plug-ins' server halves; a Flower node's partial aggregate (sums over its
    users, which it screened itself) is folded in as it is. :meth:`finish` steps the server optimiser.
    Under DP (``private``) screening rejects only non-finite uploads (:func:`~gfmfr.federation.validation.screening`);
    under central DP (``noise``) every upload is then clipped to ``noise.clip``, and :meth:`finish`
    noises the sum (:mod:`gfmfr.privacy.dp`).
    """

    def __init__(
        self,
        cfg: FederationConfig,
        plugins: tuple[Plugin, ...],
        shared: Params,
        round_: int,
        noise: CentralNoise | None = None,
        private: bool = False,
    ):
        cfg = screening(cfg, private or noise is not None)
        self.cfg, self.plugins, self.shared, self.round, self.noise = cfg, plugins, shared, round_, noise
        self.fedavg = FedAvg(cfg.weighted_aggregation)
        self.loss_sum, self.clients, self.rejected = 0.0, 0, 0

    def add(self, update: LocalUpdate) -> None:
        """Fold in one chunk of per-client uploads (``self.shared``: what the clients started from)."""
        update, rejected = keep_screened(update, self.shared, self.cfg)
        self.rejected += rejected
        if self.noise is not None:
            update = clip_updates(update, self.shared, self.noise.clip)
        self.fedavg.add(update, self.shared)
        self._count(
            float(update.loss.sum(dtype=np.float64)),
            len(update.users),
            {k: float(v.sum()) for k, v in update.metrics.items()},
        )
        for plugin in self.plugins:
            if plugin.server.wants_signatures(self.round):
                plugin.server.observe(update, self.shared, self.round)

    def add_sums(
        self,
        sums: Params,
        total: float,
        trained_rows: dict[str, torch.Tensor],
        loss_sum: float,
        clients: int,
        figures: dict[str, float],
        rejected: int,
    ) -> None:
        """Fold in a node's partial aggregate (:func:`gfmfr.flower.wire.encode_sums`)."""
        self.fedavg.add_sums(sums, total, trained_rows)
        self.rejected += rejected
        self._count(loss_sum, clients, figures)

    def _count(self, loss_sum: float, clients: int, figures: dict[str, float]) -> None:
        self.loss_sum, self.clients = self.loss_sum + loss_sum, self.clients + clients
        for plugin in self.plugins:
            plugin.server.observe_figures(figures, self.round)

    def finish(self, server_opt: ServerOptimizer) -> tuple[Params, float]:
        """The next global parameters, and the mean local loss of the clients kept (NaN without any)."""
        if self.rejected:
            log.warning("round %d: %d upload(s) rejected", self.round, self.rejected)
        loss = self.loss_sum / self.clients if self.clients else float("nan")
        if self.clients and not np.isfinite(loss):
            raise FloatingPointError(
                f"training diverged in round {self.round} (mean local loss {loss}); lower model.lr / model.item_lr"
            )
        if self.noise is None:
            return server_opt.step(self.shared, self.fedavg.result(self.shared), self.fedavg.trained_rows), loss
        # every row moves under DP: which rows were trained is not released
        average = self.noise.average(self.fedavg.sums, self.fedavg.total, self.shared, self.round)
        every_row = {n: torch.ones(len(self.shared[n]), dtype=torch.bool) for n in self.fedavg.trained_rows}
        return server_opt.step(self.shared, average, every_row), loss
