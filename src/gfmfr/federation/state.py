"""Server and client state: the global shared parameters and every client's private ones.

Private item tables (FedRAP's D_u) start at zero, so a row a client never trained is exactly
zero: only trained rows are stored, as sorted ``client * n_items + item`` keys plus values.
"""

from __future__ import annotations

import numpy as np
import torch

from gfmfr.models.base import FederatedRecommender, Params, init_tensor


class SparseRows:
    """Rows of a private item table, held per client; a row that is not held is zero.

    Each client holds its own sorted item ids and row values, as it would on a device, so
    reading or updating one client costs O(its rows).
    """

    def __init__(self, n_items: int, row_shape: tuple[int, ...]):
        self.n_items = n_items
        self.row_shape = row_shape
        self.items: dict[int, np.ndarray] = {}
        self.values: dict[int, torch.Tensor] = {}

    def _concat(self, clients: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Sorted keys ``position * n_items + item`` and values of the rows of ``clients``."""
        held = [(i, int(c)) for i, c in enumerate(clients) if int(c) in self.items]
        if not held:
            return np.empty(0, np.int64), torch.zeros((0, *self.row_shape))
        # positions ascend and each client's items are sorted, so the keys come out sorted
        keys = np.concatenate([i * self.n_items + self.items[c] for i, c in held])
        return keys, torch.cat([self.values[c] for _, c in held])

    def gather(self, clients: np.ndarray, keys: np.ndarray) -> torch.Tensor:
        """Rows for ``keys = position * n_items + item`` (positions index ``clients``); zeros where none is held."""
        out = torch.zeros((len(keys), *self.row_shape))
        held_keys, held_values = self._concat(clients)
        if len(held_keys) and len(keys):
            pos = np.minimum(np.searchsorted(held_keys, keys), len(held_keys) - 1)
            hit = held_keys[pos] == keys
            out[torch.from_numpy(np.flatnonzero(hit))] = held_values[torch.from_numpy(pos[hit])]
        return out

    def update(self, clients: np.ndarray, keys: np.ndarray, values: torch.Tensor, decay: torch.Tensor) -> None:
        """Store trained rows ``keys``/``values``; every other held row of client i is scaled by ``decay[i]``.

        Rows that are exactly zero are not kept.
        """
        old_keys, old_values = self._concat(clients)
        if len(old_keys):
            old_values = old_values * decay[torch.from_numpy(old_keys // self.n_items)].view(-1, *([1] * len(self.row_shape)))
        all_keys = np.concatenate([old_keys, keys])
        all_values = torch.cat([old_values, values.detach()])
        order = np.argsort(all_keys, kind="stable")
        all_keys, all_values = all_keys[order], all_values[torch.from_numpy(order)]
        last = np.append(all_keys[1:] != all_keys[:-1], True)  # trained rows come after held ones
        nonzero = (all_values.flatten(1) != 0).any(1).numpy() if len(all_values) else last
        keep = last & nonzero
        all_keys, all_values = all_keys[keep], all_values[torch.from_numpy(keep)]
        bounds = np.searchsorted(all_keys // self.n_items, np.arange(len(clients) + 1))
        for i, c in enumerate(clients):
            a, b = bounds[i], bounds[i + 1]
            if a == b:
                self.items.pop(int(c), None)
                self.values.pop(int(c), None)
            else:
                self.items[int(c)] = all_keys[a:b] % self.n_items
                self.values[int(c)] = all_values[a:b].clone()

    def dense(self, clients: np.ndarray) -> torch.Tensor:
        """[len(clients), n_items, *row_shape] dense tables of ``clients``."""
        out = torch.zeros((len(clients), self.n_items, *self.row_shape))
        keys, values = self._concat(clients)
        if len(keys):
            out.view(-1, *self.row_shape)[torch.from_numpy(keys)] = values
        return out

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() + self.items[c].nbytes for c, v in self.values.items())


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
            if spec.constant:
                self.shared[name] = model.constant_table(name).float()
            elif spec.shared:
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
