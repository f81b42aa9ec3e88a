"""What the server and a client say to each other in a round, as they would over a network.

The server sends a client a :class:`TrainInstruction` (the global shared parameters, the round,
a plug-in's :class:`Hints` row, and whether to upload a head signature). The client answers with
an :class:`Upload`. Between rounds the client keeps its :class:`ClientState`; nothing else about
a client crosses the boundary. The batched engine trains many clients at once and exchanges the
same messages stacked: :class:`LocalUpdate` is many uploads, :class:`Hints` many hint rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Hints:
    """A plug-in's hint for each of a set of clients: a row of ``table`` (GFMFR: its group's
    preferences over every item), shared by the clients that get the same one."""

    table: torch.Tensor
    """[H, n_items] the distinct hint rows."""
    row: np.ndarray
    """[C] the row of each client, -1 where a client gets none."""

    @staticmethod
    def none(clients: int) -> Hints:
        """No hint for any of ``clients`` clients."""
        return Hints(torch.zeros(0, 0), np.full(clients, -1))

    @staticmethod
    def single(hint: torch.Tensor | None) -> Hints:
        """The hints of one client: ``hint`` [n_items], or none."""
        return Hints.none(1) if hint is None else Hints(hint[None], np.array([0]))

    def take(self, positions: np.ndarray) -> Hints:
        """The hints of the clients at ``positions``."""
        return Hints(self.table, self.row[positions])

    def of(self, position: int) -> torch.Tensor | None:
        """Client ``position``'s hint row [n_items], or None."""
        r = int(self.row[position])
        return None if r < 0 else self.table[r]


@dataclass(frozen=True)
class TrainInstruction:
    """What the server sends one client for one round of local training."""

    round: int
    """The round (it seeds the client's negatives and minibatch order)."""
    shared: Params
    """The global shared parameters, item tables whole: [n_items, ...] or [*shape]."""
    hints: tuple[torch.Tensor | None, ...] = ()
    """One hint row per plug-in, in the order of the plug-ins (None: none this round)."""
    want_signature: bool = False
    """Upload the prediction-head signature (a plug-in groups clients by it this round)."""


@dataclass
class ClientState:
    """Everything a client keeps between rounds; it never leaves the client."""

    params: Params
    """Private parameters that are not item tables, [*shape] each (user vectors, personal heads)."""
    rows: dict[str, tuple[np.ndarray, torch.Tensor]]
    """Private item tables (FedRAP's D_u): the sorted item ids of the rows held, and the rows
    [R, *shape]; a row not held is zero."""
    scalars: dict[str, float] = field(default_factory=dict)
    """Plug-ins' per-client state (GFMFR's moving average of L_base / L_KL, NaN before the first)."""


@dataclass
class Upload:
    """What one client sends back after local training."""

    client: int
    """The client's id."""
    shared: Params
    """Its trained copies of the shared parameters that are not item tables, [*shape]."""
    rows: Params
    """Per shared item table, the rows it trained this round, [R, ...]; every other row of its copy
    is the broadcast row times :attr:`decay`."""
    row_item: np.ndarray
    """[R] item id of each row."""
    decay: dict[str, float]
    """Per shared item table, the factor weight decay applied to the rows it did not use."""
    num_samples: int
    """Local examples (positives + negatives)."""
    loss: float
    """Mean local training loss over its steps."""
    signature: torch.Tensor | None = None
    """Prediction-head parameters after training, [k], when the server asked for them."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Plug-ins' per-client figures summed over the steps (GFMFR: distillation weight and KL)."""


@dataclass
class LocalUpdate:
    """The uploads of a set of clients, stacked (the batched engine's form of :class:`Upload`)."""

    users: np.ndarray
    """The clients, in the order of every per-client array below."""
    shared: Params
    """Trained copies of the shared non-table parameters, [C, ...]."""
    rows: Params
    """Trained rows of each shared item table, [R, ...] (rows a client did not use are implicit)."""
    row_client: np.ndarray
    """Position in :attr:`users` of each row."""
    row_item: np.ndarray
    """Item index of each row."""
    decay: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per shared table, [C] factor that weight decay applied to the rows a client did not use."""
    num_samples: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Local examples (positives + negatives) per client."""
    loss: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Mean local training loss per client."""
    signatures: torch.Tensor | None = None
    """Prediction-head parameters per client after training, [C, k], when the server asked for them."""
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    """Plug-ins' per-client figures, [C] each."""

    @staticmethod
    def empty() -> LocalUpdate:
        """No clients' uploads (a node none of whose users was sampled)."""
        none = np.empty(0, np.int64)
        return LocalUpdate(none, {}, {}, none, none, num_samples=none, loss=np.empty(0))

    @staticmethod
    def stack(uploads: list[Upload]) -> LocalUpdate:
        """Many clients' uploads as one update, clients in the order given."""
        first = uploads[0]
        counts = [len(u.row_item) for u in uploads]
        return LocalUpdate(
            users=np.array([u.client for u in uploads]),
            shared={n: torch.stack([u.shared[n] for u in uploads]) for n in first.shared},
            rows={n: torch.cat([u.rows[n] for u in uploads]) for n in first.rows},
            row_client=np.repeat(np.arange(len(uploads)), counts),
            row_item=np.concatenate([u.row_item for u in uploads]).astype(np.int64),
            decay={n: torch.tensor([u.decay[n] for u in uploads]) for n in first.decay},
            num_samples=np.array([u.num_samples for u in uploads]),
            loss=np.array([u.loss for u in uploads]),
            signatures=None
            if first.signature is None
            else torch.stack([cast(torch.Tensor, u.signature) for u in uploads]),
            metrics={k: np.array([u.metrics[k] for u in uploads]) for k in first.metrics},
        )

    @staticmethod
    def concat(updates: list[LocalUpdate], order: np.ndarray | None = None) -> LocalUpdate:
        """Several sets of uploads as one (several nodes', or one set's chosen clients): the clients at
        positions ``order`` of their concatenation, in that order (default: all), each with its rows."""
        users = np.concatenate([u.users for u in updates])
        offsets = np.cumsum([0] + [len(u.users) for u in updates])[:-1]
        order = np.arange(len(users)) if order is None else np.asarray(order, np.int64)
        position = np.full(len(users), -1)
        position[order] = np.arange(len(order))  # new position of each kept client of the concatenation
        row_client = position[np.concatenate([u.row_client + o for u, o in zip(updates, offsets)])]
        kept = np.flatnonzero(row_client >= 0)
        rows = kept[np.argsort(row_client[kept], kind="stable")]  # by new client, each one's rows in order
        idx, ridx = torch.from_numpy(order), torch.from_numpy(rows)
        first = updates[0]

        def cat(values: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
            return (values[0] if len(values) == 1 else torch.cat(values)).index_select(0, index)

        return LocalUpdate(
            users=users[order],
            shared={n: cat([u.shared[n] for u in updates], idx) for n in first.shared},
            rows={n: cat([u.rows[n] for u in updates], ridx) for n in first.rows},
            row_client=row_client[rows],
            row_item=np.concatenate([u.row_item for u in updates])[rows],
            decay={n: cat([u.decay[n] for u in updates], idx) for n in first.decay},
            num_samples=np.concatenate([u.num_samples for u in updates])[order],
            loss=np.concatenate([u.loss for u in updates])[order],
            signatures=None
            if first.signatures is None
            else cat([cast(torch.Tensor, u.signatures) for u in updates], idx),
            # a node none of whose clients had a hint reports no figures: theirs are zero
            metrics={
                k: np.concatenate([u.metrics.get(k, np.zeros(len(u.users))) for u in updates])[order]
                for k in sorted(set().union(*(u.metrics for u in updates)))
            },
        )

    def dense(self, shared: Params) -> LocalUpdate:
        """These uploads with every row of every shared item table: each client's whole table, the
        broadcast rows ``shared`` shrunk by its weight decay with its trained rows in place (a dense
        upload: no item ids; it averages to the same parameters)."""
        C = len(self.users)
        rows: Params = {}
        for name, trained in self.rows.items():
            g = shared[name]
            full = g[None] * self.decay[name].view(C, *([1] * g.dim())).to(g.dtype)
            full[torch.from_numpy(self.row_client), torch.from_numpy(self.row_item)] = trained
            rows[name] = full.reshape(C * len(g), *g.shape[1:])
        n_items = len(shared[next(iter(self.rows))]) if self.rows else 0
        return LocalUpdate(
            self.users,
            self.shared,
            rows,
            np.repeat(np.arange(C), n_items),
            np.tile(np.arange(n_items), C),
            self.decay,
            self.num_samples,
            self.loss,
            self.signatures,
            self.metrics,
        )

    def upload(self, i: int) -> Upload:
        """Client ``i``'s upload (position ``i`` in :attr:`users`)."""
        sel = self.row_client == i
        idx = torch.from_numpy(np.flatnonzero(sel))
        return Upload(
            client=int(self.users[i]),
            shared={n: t[i] for n, t in self.shared.items()},
            rows={n: t.index_select(0, idx) for n, t in self.rows.items()},
            row_item=self.row_item[sel],
            decay={n: float(t[i]) for n, t in self.decay.items()},
            num_samples=int(self.num_samples[i]),
            loss=float(self.loss[i]),
            signature=None if self.signatures is None else self.signatures[i],
            metrics={k: float(v[i]) for k, v in self.metrics.items()},
        )


@dataclass
class GroupedUploads:
    """A grouping round's uploads as secure aggregation gives them to a plug-in's server half: the
    participants grouped in the clear, and their groups' item tables summed under SecAgg+."""

    users: np.ndarray
    """The participants whose signatures were grouped."""
    signatures: torch.Tensor
    """Their head signatures [C, k] (clipped and noised on the client under ``privacy.signature_noise``)."""
    labels: np.ndarray
    """Their groups [C]."""
    sums: torch.Tensor
    """[G, n_items, d] each group's summed uploads of the item table."""
    counts: torch.Tensor
    """[G] the groups' sizes."""
    touches: torch.Tensor
    """[n_items] how many participants trained each item's row."""


@dataclass
class PluginReport:
    """A plug-in's server half's account of one round, for the round log."""

    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of its phases (GFMFR: grouping, group targets, fusion, teacher)."""
    bytes_up: int = 0
    """Bytes a client uploads for it this round, beyond the shared parameters (a head signature)."""
    bytes_down: int = 0
    """Bytes a client downloads for it this round, beyond the shared parameters (a hint row)."""
    figures: dict[str, Any] = field(default_factory=dict)
    """Anything else worth logging (group sizes, the fusion loss, the mean distillation weight)."""
