"""The one client-training routine (METHOD.md, step 2).

It is written for one client and runs for any number of clients at once: every per-client
tensor carries a leading client dimension, each client's minibatches follow its own seeded
order, and clients never mix (the loss is a sum of per-client means, so each client's
gradient is exactly its own). Called with one client it is what a Flower ClientApp runs;
called with every sampled client it is the in-process batched simulation. Both give the
same parameters (tests/test_client_equivalence.py).

Efficiency, with exactness kept:
- clients are ordered by their number of local steps, so the clients still training at any
  step are a prefix and every update is a slice;
- item tables are materialised only for the rows a client uses this round (its positives
  and its negatives). A row it does not use changes only by weight decay, by the known factor
  ``(1 - lr * wd) ** steps``: the aggregator applies it to shared rows
  (:mod:`gfmfr.federation.aggregation`), the client's store to its private rows.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from gfmfr.config import FederationConfig
from gfmfr.data.dataset import Dataset
from gfmfr.data.sampling import STREAM_SHUFFLE, training_negatives, uniform
from gfmfr.federation.state import FederationState
from gfmfr.models.base import FederatedRecommender, Params


@dataclass
class Batch:
    """One local step of the clients still training (A of them)."""

    users: np.ndarray
    """User index of each of the A clients."""
    items: torch.Tensor
    """[A, B] global item index of each example."""
    labels: torch.Tensor
    """[A, B] 1 for a positive, 0 for a sampled negative."""
    mask: torch.Tensor
    """[A, B] 1 for a real example, 0 for padding."""


class LossPlugin(Protocol):
    """Adds a per-client term to the local loss (GFMFR's distillation is one)."""

    def client_loss(
        self, model: FederatedRecommender, p: Params, items: Params, logits: torch.Tensor,
        base_loss: torch.Tensor, batch: Batch, round_: int,
    ) -> torch.Tensor | None:
        """[A] extra loss per client, or None."""


@dataclass
class LocalUpdate:
    """What a set of clients sends back after local training, plus bookkeeping."""

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
    """Prediction-head parameters per client after training, [C, k] (for grouping)."""


@functools.cache
def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks instead of unmapping them.

    Local training allocates and frees tensors of tens of MB at every step; unmapped memory
    comes back as fresh zeroed pages, which costs about a third of a round. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD


def scatter_rows(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> None:
    """``table[rows[k]] += alpha * values[k]``, repeats accumulating.

    scatter_add is about twice as fast as index_add on CPU. ``values`` is not modified: autograd
    may hand the same gradient tensor to two leaves (FedRAP's C and D enter as C + D).
    """
    index = rows.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    table.scatter_add_(0, index, values if alpha == 1.0 else values * alpha)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for every (s, c)."""
    total = int(counts.sum())
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return offsets + np.arange(total)


class LocalData:
    """The round's examples, row sets and minibatch schedule of a set of clients."""

    def __init__(self, dataset: Dataset, users: np.ndarray, cfg: FederationConfig,
                 seed: int, round_: int, train_keys: np.ndarray | None = None):
        n_items, B, E = dataset.n_items, cfg.batch_size, cfg.local_epochs
        n_pos = dataset.train_counts[users]
        n_ex = n_pos * (1 + cfg.num_negatives)
        steps = E * -(-n_ex // B)
        order = np.lexsort((users, -steps))  # most steps first: the active clients are a prefix
        self.users = users = users[order]
        n_pos, n_ex, steps = n_pos[order], n_ex[order], steps[order]
        C = len(users)

        # examples: each client's positives, then its negatives
        start = np.cumsum(n_ex) - n_ex
        owner = np.repeat(np.arange(C), n_ex)
        j = np.arange(len(owner)) - start[owner]
        is_pos = j < n_pos[owner]
        items = np.empty(len(owner), np.int64)
        items[is_pos] = dataset.train_items[_ranges(dataset.train_indptr[users], n_pos)]
        items[~is_pos] = training_negatives(dataset, users, cfg.num_negatives, seed, round_, train_keys)[1]
        labels = is_pos.astype(np.float32)

        # rows: the items each client uses this round
        keys = np.sort(owner * n_items + items)
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
        self.row_client = keys // n_items
        self.row_item = keys % n_items
        self.row_ptr = np.searchsorted(self.row_client, np.arange(C + 1))
        ex_row = np.searchsorted(keys, owner * n_items + items)

        # schedule: step s holds one batch for each client with steps > s (a prefix of clients)
        self.steps = steps
        S = int(steps.max()) if C else 0
        self.active = (steps[None, :] > np.arange(S)[:, None]).sum(1)
        step_offset = np.concatenate([[0], np.cumsum(self.active)])
        n_batches = int(step_offset[-1])
        # slot[b, k]: the example in place k of batch b (-1: padding). Sorted position k holds
        # example perm[k]; owners keep their layout, so its place within the client's shuffled
        # epoch is j[k], which fixes its batch and slot
        slot = np.full(n_batches * B, -1, np.int64)
        batches_per_epoch = (steps // E)[owner]
        batch_in_epoch, within = j // B, j % B
        owner_u64 = users.astype(np.uint64)[owner]
        for e in range(E):
            key = uniform(seed, STREAM_SHUFFLE, round_, owner_u64, e, j)
            perm = np.argsort(owner + key)  # keys are distinct: no tie for the sort to break
            slot[(step_offset[e * batches_per_epoch + batch_in_epoch] + owner) * B + within] = perm
        real = slot >= 0
        src = np.where(real, slot, 0)
        rows = ex_row[src].reshape(n_batches, B)
        bitems = np.where(real, items[src], 0).reshape(n_batches, B)
        blabels = np.where(real, labels[src], 0).astype(np.float32).reshape(n_batches, B)
        bmask = real.astype(np.float32).reshape(n_batches, B)
        # padding points at a row of the same client (its first row) so gathers stay in range
        pad_owner = np.arange(n_batches) - np.repeat(step_offset[:-1], self.active)
        padded = np.nonzero(bmask == 0)
        rows[padded] = self.row_ptr[pad_owner[padded[0]]]
        self.step_offset = step_offset
        self.batch_rows = torch.from_numpy(rows)
        self.batch_items = torch.from_numpy(bitems)
        self.batch_labels = torch.from_numpy(blabels)
        self.batch_mask = torch.from_numpy(bmask)
        self.num_samples = n_ex

    def batch(self, s: int) -> tuple[int, Batch, torch.Tensor]:
        """Number of active clients, the batch, and its table rows [A, B] at step ``s``."""
        a = int(self.active[s])
        blk = slice(int(self.step_offset[s]), int(self.step_offset[s]) + a)
        batch = Batch(self.users[:a], self.batch_items[blk], self.batch_labels[blk], self.batch_mask[blk])
        return a, batch, self.batch_rows[blk]


def train_clients(
    model: FederatedRecommender,
    state: FederationState,
    users: np.ndarray,
    dataset: Dataset,
    cfg: FederationConfig,
    seed: int,
    round_: int,
    plugins: tuple[LossPlugin, ...] = (),
    train_keys: np.ndarray | None = None,
    block_clients: int = 256,
) -> LocalUpdate:
    """Local training of ``users`` for one round; private parameters are written back to ``state``."""
    keep_freed_memory()
    specs = model.param_specs()
    data = LocalData(dataset, users, cfg, seed, round_, train_keys)
    users = data.users
    C = len(users)

    dense = {n: t.clone() for n, t in state.client_params(users).items()}
    tables: Params = {}
    row_keys = data.row_client * dataset.n_items + data.row_item
    for name, spec in specs.items():
        if spec.item_table:
            if spec.shared:
                tables[name] = state.shared[name][torch.from_numpy(data.row_item)].clone()
            else:
                tables[name] = state.private_rows[name].gather(users, row_keys)

    loss_sum = torch.zeros(C)
    for s in range(len(data.active)):
        a, batch, rows = data.batch(s)
        # clients are independent: a step runs in blocks of clients to bound autograd memory
        for lo in range(0, a, block_clients):
            hi = min(a, lo + block_clients)
            part = Batch(batch.users[lo:hi], batch.items[lo:hi], batch.labels[lo:hi], batch.mask[lo:hi])
            flat_rows = rows[lo:hi].flatten()
            items = {n: t.index_select(0, flat_rows).view(hi - lo, -1, *t.shape[1:]).requires_grad_(specs[n].trainable)
                     for n, t in tables.items()}
            p = {n: t[lo:hi].detach().requires_grad_() for n, t in dense.items()}
            logits = model.forward(p, items)
            loss = model.base_loss(p, items, logits, part.labels, part.mask, round_)
            base = loss.detach()
            for plugin in plugins:
                extra = plugin.client_loss(model, p, items, logits, base, part, round_)
                if extra is not None:
                    loss = loss + extra
            trained = {n: t for n, t in items.items() if specs[n].trainable}
            leaves = list(p.values()) + list(trained.values())
            grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            with torch.no_grad():
                loss_sum[lo:hi] += loss.detach()
                for (name, t), g in zip(dense.items(), grads[: len(p)]):
                    spec = specs[name]
                    if spec.weight_decay:
                        t[lo:hi].mul_(1 - spec.lr * spec.weight_decay)
                    if g is not None:
                        t[lo:hi].sub_(spec.lr * g)
                lo_row, hi_row = int(data.row_ptr[lo]), int(data.row_ptr[hi])
                for name, g in zip(trained, grads[len(p):]):
                    t, spec = tables[name], specs[name]
                    if spec.weight_decay:
                        t[lo_row:hi_row].mul_(1 - spec.lr * spec.weight_decay)
                    if g is not None:
                        scatter_rows(t, flat_rows, g.flatten(0, 1), -spec.lr)

    # private parameters stay on the client; held rows it did not use only decayed
    steps = torch.from_numpy(data.steps).double()
    idx = torch.from_numpy(users)
    for name, spec in specs.items():
        if spec.shared:
            continue
        if spec.item_table:
            decay = ((1 - spec.lr * spec.weight_decay) ** steps).float()
            state.private_rows[name].update(users, row_keys, tables[name], decay)
        else:
            state.private[name][idx] = dense[name]

    return LocalUpdate(
        users=users,
        shared={n: dense[n] for n, s in specs.items() if s.shared and not s.item_table},
        rows={n: tables[n] for n, s in specs.items() if s.shared and s.item_table and s.trainable},
        row_client=data.row_client,
        row_item=data.row_item,
        decay={n: ((1 - s.lr * s.weight_decay) ** steps).float()
               for n, s in specs.items() if s.shared and s.item_table and s.trainable},
        num_samples=data.num_samples,
        loss=(loss_sum / torch.from_numpy(data.steps).clamp_min(1)).numpy(),
        signatures=model.head_signature(dense).detach(),
    )
