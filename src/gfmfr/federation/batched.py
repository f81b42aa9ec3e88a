"""The batched engine: :func:`gfmfr.federation.client_step.client_step` for many clients at once.

Every per-client tensor carries a leading client dimension, each client's minibatches follow its
own seeded order (the one-client step's), and clients never mix (the loss is a sum of per-client
means, so each client's gradient is exactly its own). For any set of clients it gives what calling
the one-client step once per client gives (tests/test_client_training.py); it is only faster.

How, with exactness kept (the machinery itself lives in :mod:`gfmfr.federation.fast`):
- clients are ordered by their number of local steps, so the clients still training at any
  step are a prefix; within a step, blocks of clients are cut to the width of their fullest
  batch, so little time goes to padding;
- item tables are materialised only for the rows a client uses this round (its positives
  and its negatives). A row it does not use changes only by weight decay, by the known factor
  ``(1 - lr * wd) ** steps``: the aggregator applies it to shared rows
  (:mod:`gfmfr.federation.aggregation`), the client's store to its private rows; within the
  round, :class:`~gfmfr.federation.fast.LazyDecay` applies it as one scalar per step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from gfmfr.config import FederationConfig
from gfmfr.data.dataset import Dataset
from gfmfr.data.sampling import (
    STREAM_SHUFFLE,
    hash_fold,
    hash_u64,
    to_unit,
    training_negatives,
)
from gfmfr.federation.batch import Batch
from gfmfr.federation.fast import LazyDecay, keep_freed_memory, ranges
from gfmfr.federation.messages import Hints, LocalUpdate
from gfmfr.federation.plugin import LossContext, LossTerm
from gfmfr.federation.state import FederationState
from gfmfr.models.base import FederatedRecommender, Params


class LocalData:
    """The round's examples, row sets and minibatch schedule of a set of clients."""

    def __init__(
        self,
        dataset: Dataset,
        users: np.ndarray,
        cfg: FederationConfig,
        seed: int,
        round_: int,
        train_keys: np.ndarray | None = None,
    ):
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
        items[is_pos] = dataset.train_items[ranges(dataset.train_indptr[users], n_pos)]
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
        slot: np.ndarray = np.full(n_batches * B, -1, np.int64)
        batches_per_epoch = (steps // E)[owner]
        batch_in_epoch, within = j // B, j % B
        user_hash = hash_u64(seed, STREAM_SHUFFLE, round_, users.astype(np.uint64))
        for e in range(E):
            key = to_unit(hash_fold(hash_fold(user_hash, e)[owner], j))  # = uniform(seed, ..., user, e, j)
            perm = np.argsort(owner + key)  # keys are distinct: no tie for the sort to break
            slot[(step_offset[e * batches_per_epoch + batch_in_epoch] + owner) * B + within] = perm
        # within a step, batches go from the fullest to the emptiest (real examples come first
        # in a batch), so a block of clients can be cut to the width of its fullest batch
        slot = slot.reshape(n_batches, B)
        count = (slot >= 0).sum(1)
        by_fill = np.lexsort((-count, np.repeat(np.arange(S), self.active)))
        slot, count = slot[by_fill], count[by_fill]
        self.batch_client = (np.arange(n_batches) - np.repeat(step_offset[:-1], self.active))[by_fill]
        # a padding slot (-1) reads the sentinel appended to each per-example array (item 0, label 0)
        # and points at a row of its own client (the first) so that gathers stay in range
        real = slot >= 0
        rows = np.where(real, np.append(ex_row, 0)[slot], self.row_ptr[self.batch_client][:, None])
        self.step_offset = step_offset
        self.batch_count = count
        self.batch_rows = torch.from_numpy(rows)
        self.batch_items = torch.from_numpy(np.append(items, 0)[slot])
        self.batch_labels = torch.from_numpy(np.append(labels, np.float32(0))[slot])
        self.batch_mask = torch.from_numpy(real.astype(np.float32))
        self.num_samples = n_ex

    def blocks(self, s: int, max_clients: int) -> Iterator[tuple[np.ndarray, Batch, torch.Tensor]]:
        """The batches of step ``s`` in blocks of at most ``max_clients`` clients.

        Yields (client positions, batch, table rows [A, W]), each block cut to the width W of its
        fullest batch (cutting blocks finer saves padding but costs more than it saves on ML-100K).
        """
        start, end = int(self.step_offset[s]), int(self.step_offset[s + 1])
        for lo in range(start, end, max_clients):
            blk = slice(lo, min(end, lo + max_clients))
            width = int(self.batch_count[lo])
            pos = self.batch_client[blk]
            batch = Batch(
                self.users[pos],
                self.batch_items[blk, :width],
                self.batch_labels[blk, :width],
                self.batch_mask[blk, :width],
            )
            yield pos, batch, self.batch_rows[blk, :width]

    def batch(self, s: int) -> Batch:
        """The whole of step ``s`` (every active client, full width), clients in :meth:`blocks` order."""
        blk = slice(int(self.step_offset[s]), int(self.step_offset[s + 1]))
        return Batch(
            self.users[self.batch_client[blk]], self.batch_items[blk], self.batch_labels[blk], self.batch_mask[blk]
        )


def train_clients(
    model: FederatedRecommender,
    state: FederationState,
    users: np.ndarray,
    dataset: Dataset,
    cfg: FederationConfig,
    seed: int,
    round_: int,
    terms: tuple[LossTerm, ...] = (),
    hints: tuple[Hints, ...] = (),
    want_signatures: bool = False,
    train_keys: np.ndarray | None = None,
    block_clients: int = 256,
    data: LocalData | None = None,
) -> LocalUpdate:
    """Local training of ``users`` for one round; their private state is written back to ``state``.

    ``terms`` are the plug-ins' client halves, ``hints[k]`` term k's hint of each of ``users`` (in
    the order given). ``data``, if given, is ``LocalData(dataset, users, cfg, seed, round_, train_keys)``
    built ahead.
    """
    keep_freed_memory()
    kinds, specs = model.kinds, model.kinds.specs
    if data is None:
        data = LocalData(dataset, users, cfg, seed, round_, train_keys)
    given = np.argsort(users, kind="stable")
    where = given[np.searchsorted(users[given], data.users)]  # position in `users` of each of data.users
    hints = tuple(h.take(where) for h in hints) + (Hints.none(len(users)),) * (len(terms) - len(hints))
    users = data.users
    C = len(users)

    dense = {n: t.clone() for n, t in state.client_params(users).items()}
    scalars = [{k: state.scalars[k][state.slots(users)].clone() for k in t.state_init} for t in terms]
    figures: dict[str, torch.Tensor] = {}
    tables: Params = {}
    row_keys = data.row_client * dataset.n_items + data.row_item
    for name in kinds.tables:
        if name in kinds.private_tables:
            tables[name] = state.private_rows[name].gather(users, row_keys)
        else:
            tables[name] = state.shared[name].index_select(0, torch.from_numpy(data.row_item))  # a copy

    decayed = {
        n: LazyDecay(tables[n], 1 - specs[n].lr * specs[n].weight_decay, data.steps[data.row_client])
        for n in tables
        if n in kinds.trainable
    }
    # gradients come scaled as the first table's update needs them, which saves a pass over its
    # [A, B, d] gradient; the dense updates divide the scale out for free
    lead = next(iter(decayed), None)
    loss_sum = torch.zeros(C)
    for s in range(len(data.active)):
        for lazy in decayed.values():
            lazy.settle_if_small(s)
        # clients are independent: a step runs in blocks of clients to bound autograd memory
        for pos, part, rows in data.blocks(s, block_clients):
            idx = torch.from_numpy(pos)
            flat_rows = rows.flatten()
            items = {
                n: (decayed[n].gather(flat_rows, s) if n in decayed else t.index_select(0, flat_rows))
                .view(len(pos), -1, *t.shape[1:])
                .requires_grad_(n in decayed)
                for n, t in tables.items()
            }
            p = {n: t.index_select(0, idx).requires_grad_() for n, t in dense.items()}
            logits = model.forward(p, items)
            loss = model.base_loss(p, items, logits, part.labels, part.mask, round_)
            base = loss.detach()
            for term, hint, own in zip(terms, hints, scalars):
                ctx = LossContext(
                    model,
                    p,
                    items,
                    logits,
                    base,
                    part,
                    hint.take(pos),
                    {k: v.index_select(0, idx) for k, v in own.items()},
                    {},
                    round_,
                    cfg.batch_size,
                )
                extra = term.loss(ctx)
                for k, v in ctx.state.items():
                    own[k].index_copy_(0, idx, v.detach())
                for k, v in ctx.figures.items():
                    figures.setdefault(k, torch.zeros(C, dtype=torch.float64)).index_add_(0, idx, v.detach().double())
                if extra is not None:
                    loss = loss + extra
            leaves = list(p.values()) + [items[n] for n in decayed]
            grad_scale = decayed[lead].step_scale(specs[lead].lr, s) if lead else 1.0
            grads = torch.autograd.grad(loss.sum(), leaves, torch.tensor(grad_scale), allow_unused=True)
            with torch.no_grad():
                loss_sum.index_add_(0, idx, loss.detach())
                for (name, t), g in zip(p.items(), grads[: len(p)]):
                    spec = specs[name]
                    t = t.detach()
                    if spec.weight_decay:
                        t.mul_(1 - spec.lr * spec.weight_decay)
                    if g is not None:
                        t.sub_(g, alpha=spec.lr / grad_scale)
                    dense[name].index_copy_(0, idx, t)
                for name, g in zip(decayed, grads[len(p) :]):
                    if g is not None:
                        decayed[name].step(flat_rows, g.flatten(0, 1), specs[name].lr, s, grad_scale)
    for lazy in decayed.values():
        lazy.settle(len(data.active))

    # private state stays on the client; held rows it did not use only decayed
    steps = torch.from_numpy(data.steps).double()
    idx = state.slots(users)
    for name in kinds.private_tables:
        decay = ((1 - specs[name].lr * specs[name].weight_decay) ** steps).float()
        state.private_rows[name].update(users, row_keys, tables[name], decay)
    for name in kinds.private_dense:
        state.private[name][idx] = dense[name]
    for own in scalars:
        for k, v in own.items():
            state.scalars[k][idx] = v

    return LocalUpdate(
        users=users,
        shared={n: dense[n] for n in kinds.shared_dense},
        rows={n: tables[n] for n in kinds.shared_tables},
        row_client=data.row_client,
        row_item=data.row_item,
        decay={n: ((1 - specs[n].lr * specs[n].weight_decay) ** steps).float() for n in kinds.shared_tables},
        num_samples=data.num_samples,
        loss=(loss_sum / torch.from_numpy(data.steps).clamp_min(1)).numpy(),
        signatures=model.head_signature(dense).detach() if want_signatures else None,
        metrics={k: v.numpy() for k, v in figures.items()},
    )
