"""Server and client state: the global shared parameters, and stores of the clients' private state.

A :class:`ClientStore` holds each client's :class:`~gfmfr.federation.messages.ClientState` by
client id. :class:`FederationState` is the in-process store (every client's private tensors
stacked, for the batched engine) together with the global shared parameters; :class:`FileStore`
keeps one safetensors file per client in a directory, written atomically, for a node that must
survive a restart. A client's initial state depends only on (seed, client id).

Private item tables (FedRAP's D_u) start at zero, so a row a client never trained is exactly
zero: only trained rows are stored, per client as sorted item ids pointing into a row pool.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gfmfr.data.sampling import STREAM_INIT, uniform
from gfmfr.federation.messages import ClientState
from gfmfr.models.base import FederatedRecommender, Params, ParamSpec, init_tensor


def client_init(spec: ParamSpec, name: str, clients: np.ndarray, std: float, seed: int) -> torch.Tensor:
    """Initial value of private parameter ``name`` for each of ``clients``, [C, *spec.shape].

    A pure function of (seed, client id, parameter name), counter-based like every other draw
    (:mod:`gfmfr.data.sampling`): a client starts the same whether it is alone on a device, one of
    a node's thousands, or one of a federation of any size.
    """
    clients = np.asarray(clients, np.int64)
    shape = (len(clients), *spec.shape)
    if spec.init in ("zeros", "ones"):
        return torch.zeros(shape) if spec.init == "zeros" else torch.ones(shape)
    n = math.prod(spec.shape)
    key = zlib.crc32(name.encode())
    u = uniform(seed, STREAM_INIT, clients[:, None], key, np.arange(2 * n)[None, :])
    if spec.init == "normal":  # Box-Muller on two independent uniforms per value
        value = np.sqrt(-2 * np.log1p(-u[:, :n])) * np.cos(2 * np.pi * u[:, n:]) * std
    elif spec.init == "xavier":
        value = (u[:, :n] * 2 - 1) * math.sqrt(6.0 / (spec.shape[-2] + spec.shape[-1]))
    else:
        raise ValueError(f"unknown init {spec.init!r}")
    return torch.from_numpy(value.astype(np.float32)).reshape(shape)


class SparseRows:
    """Rows of a private item table, held per client; a row that is not held is zero.

    Each client holds its own sorted item ids and, for each, a slot in a shared append-only
    pool of row values, as it would hold them on a device: reading or updating a set of
    clients costs O(the rows asked for), never O(every row held). Weight decay of the rows a
    client holds but did not train is applied lazily, as one scale per client: the value of a
    row is ``scale[client] * pool[slot]``.
    """

    def __init__(self, n_items: int, row_shape: tuple[int, ...], capacity: int = 1024):
        self.n_items = n_items
        self.row_shape = row_shape
        self.items: dict[int, np.ndarray] = {}
        """Sorted item ids each client holds."""
        self.slots: dict[int, np.ndarray] = {}
        """Pool slot of each held item, aligned with :attr:`items`."""
        self.scale: dict[int, float] = {}
        """Lazy weight-decay factor of each client's rows."""
        self.pool = torch.empty((capacity, *row_shape))
        self.used = 0

    def _held(self, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted keys ``position * n_items + item`` of the rows ``clients`` hold, and their slots."""
        held = [(i, int(c)) for i, c in enumerate(clients) if int(c) in self.items]
        if not held:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        # positions ascend and each client's items are sorted, so the keys come out sorted
        keys = np.concatenate([i * self.n_items + self.items[c] for i, c in held])
        return keys, np.concatenate([self.slots[c] for _, c in held])

    def _lookup(self, clients: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key: whether it is held (bool) and, where it is, its slot."""
        held_keys, held_slots = self._held(clients)
        if not len(held_keys):
            return np.zeros(len(keys), bool), np.zeros(len(keys), np.int64)
        pos = np.minimum(np.searchsorted(held_keys, keys), len(held_keys) - 1)
        return held_keys[pos] == keys, held_slots[pos]

    def _scales(self, clients: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """Per-row scale column for rows at ``positions`` (indices into ``clients``)."""
        scale = np.array([self.scale.get(int(c), 1.0) for c in clients])
        return torch.from_numpy(scale[positions].astype(np.float32)).view(-1, *([1] * len(self.row_shape)))

    def gather(self, clients: np.ndarray, keys: np.ndarray) -> torch.Tensor:
        """Rows for ``keys = position * n_items + item`` (positions index ``clients``); zeros where none is held."""
        out = torch.zeros((len(keys), *self.row_shape))
        hit, slot = self._lookup(clients, keys)
        if hit.any():
            idx = np.flatnonzero(hit)
            values = self.pool[torch.from_numpy(slot[idx])] * self._scales(clients, keys[idx] // self.n_items)
            out[torch.from_numpy(idx)] = values
        return out

    def _grow(self, rows: int) -> None:
        if self.used + rows > len(self.pool):
            pool = torch.empty((max(self.used + rows, len(self.pool) * 3 // 2), *self.row_shape))
            pool[: self.used] = self.pool[: self.used]
            self.pool = pool

    def update(self, clients: np.ndarray, keys: np.ndarray, values: torch.Tensor, decay: torch.Tensor) -> None:
        """Store trained rows ``keys``/``values`` (keys sorted); every other held row of client i is scaled
        by ``decay[i]``.

        A new row that is exactly zero is not kept.
        """
        for c, f in zip(clients, decay.tolist()):
            c = int(c)
            if c in self.items:
                self.scale[c] *= f
                if self.scale[c] < 1e-20:  # fold the factor into the rows before it underflows
                    rows = torch.from_numpy(self.slots[c])
                    self.pool[rows] = self.pool[rows] * self.scale[c]
                    self.scale[c] = 1.0
        values = values.detach()
        hit, slot = self._lookup(clients, keys)
        pos = keys // self.n_items
        if hit.any():
            idx = np.flatnonzero(hit)
            self.pool[torch.from_numpy(slot[idx])] = values[torch.from_numpy(idx)] / self._scales(clients, pos[idx])
        new = np.flatnonzero(~hit)
        if len(new):
            nonzero = (values[torch.from_numpy(new)].flatten(1) != 0).any(1).numpy()
            new = new[nonzero]
        if not len(new):
            return
        new_clients = np.unique(pos[new])
        for i in new_clients:
            self.scale.setdefault(int(clients[i]), 1.0)
        self._grow(len(new))
        new_slots = self.used + np.arange(len(new))
        self.pool[self.used : self.used + len(new)] = values[torch.from_numpy(new)] / self._scales(clients, pos[new])
        self.used += len(new)
        # merge each client's new items into its sorted list
        bounds = np.searchsorted(pos[new], np.append(new_clients, new_clients[-1] + 1), side="left")
        bounds[-1] = len(new)
        for k, i in enumerate(new_clients):
            c = int(clients[i])
            items = keys[new[bounds[k] : bounds[k + 1]]] % self.n_items
            slots = new_slots[bounds[k] : bounds[k + 1]]
            if c in self.items:
                old_items, old_slots = self.items[c], self.slots[c]
                at = np.searchsorted(old_items, items)
                items, slots = np.insert(old_items, at, items), np.insert(old_slots, at, slots)
            self.items[c], self.slots[c] = items, slots

    def rows_of(self, client: int) -> tuple[np.ndarray, torch.Tensor]:
        """The sorted item ids client ``client`` holds and their rows."""
        if client not in self.items:
            return np.empty(0, np.int64), torch.empty(0, *self.row_shape)
        return self.items[client].copy(), self.pool[torch.from_numpy(self.slots[client])] * self.scale[client]

    def set(self, client: int, items: np.ndarray, values: torch.Tensor) -> None:
        """Replace every row client ``client`` holds by ``values`` at the sorted ``items`` (in its own
        slots when it had as many, else in new ones)."""
        old = self.slots.get(client, np.empty(0, np.int64))
        if len(old) >= len(items):
            slots = old[: len(items)]
        else:
            self._grow(len(items))
            slots = self.used + np.arange(len(items))
            self.used += len(items)
        self.items[client] = np.asarray(items, np.int64).copy()
        self.slots[client] = slots
        self.scale[client] = 1.0
        self.pool[torch.from_numpy(slots)] = values

    def dense(self, clients: np.ndarray) -> torch.Tensor:
        """[len(clients), n_items, *row_shape] dense tables of ``clients``."""
        out = torch.zeros((len(clients), self.n_items, *self.row_shape))
        keys, slots = self._held(clients)
        if len(keys):
            rows = self.pool[torch.from_numpy(slots)] * self._scales(clients, keys // self.n_items)
            out.view(-1, *self.row_shape)[torch.from_numpy(keys)] = rows
        return out

    def raw(self) -> dict[str, torch.Tensor]:
        """Every field, exactly (a checkpoint: the rows come back bit for bit, lazy scales included)."""
        clients = np.array(sorted(self.items), np.int64)
        return {
            "clients": torch.from_numpy(clients),
            "counts": torch.tensor([len(self.items[c]) for c in clients], dtype=torch.int64),
            "items": torch.from_numpy(np.concatenate([self.items[c] for c in clients]).astype(np.int64))
            if len(clients)
            else torch.zeros(0, dtype=torch.int64),
            "slots": torch.from_numpy(np.concatenate([self.slots[c] for c in clients]).astype(np.int64))
            if len(clients)
            else torch.zeros(0, dtype=torch.int64),
            "scale": torch.tensor([self.scale.get(int(c), 1.0) for c in clients], dtype=torch.float64),
            "pool": self.pool[: self.used].clone(),
        }

    def load_raw(self, raw: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`raw`."""
        clients, counts = raw["clients"].numpy(), raw["counts"].numpy()
        starts = np.concatenate([[0], np.cumsum(counts)])
        items, slots = raw["items"].numpy(), raw["slots"].numpy()
        self.items = {int(c): items[starts[i] : starts[i + 1]].copy() for i, c in enumerate(clients)}
        self.slots = {int(c): slots[starts[i] : starts[i + 1]].copy() for i, c in enumerate(clients)}
        self.scale = {int(c): float(v) for c, v in zip(clients, raw["scale"].tolist())}
        self.pool = raw["pool"].clone() if len(raw["pool"]) else torch.empty((1024, *self.row_shape))
        self.used = len(raw["pool"])

    @property
    def nbytes(self) -> int:
        """Memory of the row pool plus every client's item ids and slots."""
        index = sum(self.items[c].nbytes + self.slots[c].nbytes for c in self.items)
        return self.pool.numel() * self.pool.element_size() + index


class ClientStore(Protocol):
    """Private state of clients, by client id."""

    def load(self, client: int) -> ClientState:
        """Client ``client``'s state (its initial state if it has never trained)."""

    def save(self, client: int, state: ClientState) -> None:
        """Keep ``state`` as client ``client``'s state."""


class FederationState:
    """Global shared parameters plus the private state of every client (the in-process :class:`ClientStore`)."""

    def __init__(self, model: FederatedRecommender, n_clients: int, seed: int, clients: np.ndarray | None = None):
        """Every client of a federation of ``n_clients`` (ids 0..n-1), or only ``clients`` (the ids a
        node hosts): private tensors hold one slot per client held (:meth:`slots`)."""
        self.model = model
        self.clients = np.arange(n_clients) if clients is None else np.sort(np.asarray(clients, np.int64))
        self._all = clients is None
        n_clients = len(self.clients)
        self.n_clients = n_clients
        gen = torch.Generator().manual_seed(seed)  # shared parameters and same-init private ones
        std = model.cfg.init_std
        self.shared: Params = {}
        self.private: Params = {}
        self.private_rows: dict[str, SparseRows] = {}
        self.scalars: dict[str, torch.Tensor] = {}
        """Plug-ins' per-client scalars (GFMFR's EMA ratio), [n_clients] each (:meth:`add_scalars`)."""
        self.scalar_init: dict[str, float] = {}
        self.same_init: Params = {}
        """The value every client starts from, for private parameters declared ``same_init``."""
        self.seed = seed
        kinds = model.kinds
        for name, spec in kinds.specs.items():  # in the specs' order: the shared draws come in sequence
            if name in kinds.constant_tables:
                self.shared[name] = model.constant_table(name).float()
            elif name in kinds.shared:
                lead = (model.n_items,) if name in kinds.shared_tables else ()
                self.shared[name] = init_tensor(spec, lead, std, gen)
            elif name in kinds.private_tables:
                if spec.init != "zeros":
                    raise ValueError(f"private item table {name!r} must start at zero (stored sparsely)")
                self.private_rows[name] = SparseRows(model.n_items, spec.shape)
            elif spec.same_init:
                self.same_init[name] = init_tensor(spec, (), std, gen)
                self.private[name] = self.same_init[name].expand(n_clients, *spec.shape).clone()
            else:
                self.private[name] = client_init(spec, name, self.clients, std, seed)

    def slots(self, clients: np.ndarray | int) -> torch.Tensor:
        """Where the private tensors hold ``clients`` (their ids, when this store holds every client)."""
        clients = np.asarray(clients, np.int64)
        if self._all:
            return torch.from_numpy(clients)
        slot = np.searchsorted(self.clients, clients)
        if (slot >= len(self.clients)).any() or (
            self.clients[np.minimum(slot, len(self.clients) - 1)] != clients
        ).any():
            raise KeyError(f"this store does not hold client(s) {np.setdiff1d(clients, self.clients)[:5].tolist()}")
        return torch.as_tensor(slot)

    def add_scalars(self, init: dict[str, float]) -> None:
        """Keep a plug-in's per-client scalars, every client starting at ``init[name]``."""
        for name, value in init.items():
            if name in self.scalars:
                raise ValueError(f"two plug-ins keep a per-client scalar named {name!r}")
            self.scalars[name] = torch.full((self.n_clients,), float(value))
            self.scalar_init[name] = float(value)

    def initial_state(self, client: int) -> ClientState:
        """Client ``client``'s state before it first trains: a function of (seed, client id) only."""
        kinds = self.model.kinds
        params: Params = {}
        for name in kinds.private_dense:
            params[name] = (
                self.same_init[name].clone()
                if kinds.specs[name].same_init
                else client_init(kinds.specs[name], name, np.array([client]), self.model.cfg.init_std, self.seed)[0]
            )
        rows = {n: (np.empty(0, np.int64), torch.empty(0, *r.row_shape)) for n, r in self.private_rows.items()}
        return ClientState(params, rows, dict(self.scalar_init))

    def load(self, client: int) -> ClientState:
        slot = int(self.slots(client))
        return ClientState(
            params={n: t[slot].clone() for n, t in self.private.items()},
            rows={n: r.rows_of(client) for n, r in self.private_rows.items()},
            scalars={k: float(v[slot]) for k, v in self.scalars.items()},
        )

    def save(self, client: int, state: ClientState) -> None:
        slot = int(self.slots(client))
        for n, t in state.params.items():
            self.private[n][slot] = t
        for n, (items, values) in state.rows.items():
            self.private_rows[n].set(client, items, values)
        for k, v in state.scalars.items():
            self.scalars[k][slot] = v

    def private_tensors(self) -> dict[str, torch.Tensor]:
        """Every client's private state held here, exactly, as named tensors (sparse rows as held, lazy
        scales included): what a checkpoint and a node's state file keep."""
        out = {"clients": torch.from_numpy(self.clients.copy())}
        out.update({f"param/{n}": t for n, t in self.private.items()})
        out.update({f"scalar/{k}": v for k, v in self.scalars.items()})
        for name, rows in self.private_rows.items():
            out.update({f"rows/{name}/{k}": v for k, v in rows.raw().items()})
        return out

    def load_private_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`private_tensors` (of a store holding the same clients)."""
        if not np.array_equal(tensors["clients"].numpy(), self.clients):
            raise ValueError("the saved private state is of other clients than this store holds")
        for key, value in tensors.items():
            kind, _, name = key.partition("/")
            if kind == "param":
                self.private[name] = value.clone()
            elif kind == "scalar":
                self.scalars[name] = value.clone()
        for name, rows in self.private_rows.items():
            prefix = f"rows/{name}/"
            rows.load_raw({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    def client_params(self, clients: np.ndarray) -> Params:
        """Per-client parameters of ``clients``: shared ones broadcast, private ones gathered."""
        idx = self.slots(clients)
        kinds = self.model.kinds
        return {
            n: self.shared[n].expand(len(clients), *kinds.specs[n].shape)
            if n in kinds.shared_dense
            else self.private[n][idx]
            for n in kinds.dense
        }

    def score(self, users: np.ndarray) -> torch.Tensor:
        """Logits [U, n_items] of every item for ``users`` with the current global and private parameters."""
        items = {
            n: self.private_rows[n].dense(users)
            if n in self.model.kinds.private_tables
            else self.shared[n].expand(len(users), *self.shared[n].shape)
            for n in self.model.kinds.tables
        }
        return self.model.forward(self.client_params(users), items)

    def private_nbytes(self) -> int:
        """Memory held by all clients' private parameters."""
        dense = sum(t.numel() * t.element_size() for t in self.private.values())
        return dense + sum(r.nbytes for r in self.private_rows.values())


class FileStore:
    """Client states in a directory, one safetensors file per client, each written atomically
    (a temporary file, then a rename): a node killed mid-write keeps the previous state.

    A client with no file yet gets ``initial(client)``.
    """

    def __init__(self, directory: str | Path, initial: Callable[[int], ClientState]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.initial = initial

    def path(self, client: int) -> Path:
        return self.directory / f"client-{client}.safetensors"

    def load(self, client: int) -> ClientState:

        path = self.path(client)
        if not path.exists():
            return self.initial(client)
        tensors = load_file(path)
        state = ClientState({}, {}, {})
        for key, value in tensors.items():
            kind, name = key.split("/", 1)
            if kind == "param":
                state.params[name] = value
            elif kind == "rows":
                state.rows[name] = (tensors[f"items/{name}"].numpy(), value)
            elif kind == "scalar":
                state.scalars[name] = float(value)
        return state

    def save(self, client: int, state: ClientState) -> None:
        tensors = {f"param/{n}": t.contiguous() for n, t in state.params.items()}
        for n, (items, values) in state.rows.items():
            tensors[f"rows/{n}"] = values.contiguous()
            tensors[f"items/{n}"] = torch.from_numpy(np.asarray(items, np.int64))
        tensors.update({f"scalar/{k}": torch.tensor(v, dtype=torch.float64) for k, v in state.scalars.items()})
        save_tensors(tensors, self.path(client))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (and string ``metadata``) to ``path`` (safetensors) atomically: to a temporary
    file beside it, then a rename, so that a process killed mid-write leaves the previous file whole."""

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
