"""Server and client state: the global shared parameters and every client's private ones.

Private item tables (FedRAP's D_u) start at zero, so a row a client never trained is exactly
zero: only trained rows are stored, as sorted ``client * n_items + item`` keys plus values.
"""

from __future__ import annotations

import numpy as np
import torch

from gfmfr.models.base import FederatedRecommender, Params, init_tensor


class SparseRows:
    """Rows of a private item table per client; absent rows are zero."""

    def __init__(self, n_items: int, row_shape: tuple[int, ...]):
        self.n_items = n_items
        self.row_shape = row_shape
        self.keys = np.empty(0, dtype=np.int64)
        self.values = torch.zeros((0, *row_shape))

    def gather(self, keys: np.ndarray) -> torch.Tensor:
        """Rows for ``keys`` (zeros where none is stored)."""
        out = torch.zeros((len(keys), *self.row_shape))
        if len(self.keys) and len(keys):
            pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            hit = self.keys[pos] == keys
            out[torch.from_numpy(np.flatnonzero(hit))] = self.values[torch.from_numpy(pos[hit])]
        return out

    def keys_of(self, clients: np.ndarray) -> np.ndarray:
        """Stored keys belonging to ``clients``."""
        if not len(self.keys):
            return self.keys
        return self.keys[np.isin(self.keys // self.n_items, clients)]

    def replace(self, clients: np.ndarray, keys: np.ndarray, values: torch.Tensor) -> None:
        """Drop every stored row of ``clients`` and store ``keys``/``values`` (keys of those clients)."""
        keep = ~np.isin(self.keys // self.n_items, clients) if len(self.keys) else np.zeros(0, bool)
        nonzero = values.flatten(1).abs().sum(1) > 0 if len(values) else torch.zeros(0, dtype=torch.bool)
        keys, values = keys[nonzero.numpy()], values[nonzero]
        all_keys = np.concatenate([self.keys[keep], keys])
        all_values = torch.cat([self.values[torch.from_numpy(keep)], values.detach()])
        order = np.argsort(all_keys, kind="stable")
        self.keys, self.values = all_keys[order], all_values[torch.from_numpy(order)]

    def dense(self, clients: np.ndarray) -> torch.Tensor:
        """[len(clients), n_items, *row_shape] dense tables of ``clients``."""
        out = torch.zeros((len(clients), self.n_items, *self.row_shape))
        keys = self.keys_of(clients)
        if len(keys):
            by_client = np.argsort(clients)
            rows = by_client[np.searchsorted(clients[by_client], keys // self.n_items)]
            out[torch.from_numpy(rows), torch.from_numpy(keys % self.n_items)] = self.gather(keys)
        return out

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.numel() * self.values.element_size()


class FederationState:
    """Global shared parameters plus the private parameters of every client."""

    def __init__(self, model: FederatedRecommender, n_clients: int, seed: int):
        self.model = model
        self.n_clients = n_clients
        gen = torch.Generator().manual_seed(seed)
        std = model.cfg.init_std
        self.shared: Params = {}
        self.private: Params = {}
        self.private_rows: dict[str, SparseRows] = {}
        for name, spec in model.param_specs().items():
            if spec.shared:
                lead = (model.n_items,) if spec.item_table else ()
                self.shared[name] = init_tensor(spec, lead, std, gen)
            elif spec.item_table:
                if spec.init != "zeros":
                    raise ValueError(f"private item table {name!r} must start at zero (stored sparsely)")
                self.private_rows[name] = SparseRows(model.n_items, spec.shape)
            elif spec.same_init:
                self.private[name] = init_tensor(spec, (), std, gen).expand(n_clients, *spec.shape).clone()
            else:
                self.private[name] = init_tensor(spec, (n_clients,), std, gen)
        self.participated = np.zeros(n_clients, dtype=np.int64)

    def client_params(self, clients: np.ndarray) -> Params:
        """Per-client parameters of ``clients``: shared ones broadcast, private ones gathered."""
        idx = torch.from_numpy(clients)
        out: Params = {}
        for name, spec in self.model.param_specs().items():
            if spec.item_table:
                continue
            if spec.shared:
                out[name] = self.shared[name].expand(len(clients), *spec.shape)
            else:
                out[name] = self.private[name][idx]
        return out

    def score(self, users: np.ndarray) -> torch.Tensor:
        """Logits [U, n_items] of every item for ``users`` with the current global and private parameters."""
        p = self.client_params(users)
        items: Params = {}
        for name, spec in self.model.param_specs().items():
            if spec.item_table:
                if spec.shared:
                    items[name] = self.shared[name].expand(len(users), *self.shared[name].shape)
                else:
                    items[name] = self.private_rows[name].dense(users)
        return self.model.forward(p, items)

    def private_nbytes(self) -> int:
        """Memory held by all clients' private parameters."""
        dense = sum(t.numel() * t.element_size() for t in self.private.values())
        return dense + sum(r.nbytes for r in self.private_rows.values())
