"""One client's local training for one round (docs/method.md, step 2): the algorithm, for one client.

The client reads the model, its own state, what the server sent it (the shared parameters, the
round, each plug-in's hint) and its own training positives. It samples its negatives from
(seed, client id, round), trains with plain SGD through its minibatches, and returns its new
state and its :class:`Upload`. It writes nothing else.

A Flower ClientApp or a device runs this. The in-process engine runs
:func:`gfmfr.federation.batched.train_clients`, a faster implementation of the same step for many
clients at once, held to this one by tests/test_client_training.py.
"""

from __future__ import annotations

import numpy as np
import torch

from gfmfr.config import FederationConfig
from gfmfr.data.sampling import client_negatives, epoch_order
from gfmfr.federation.batch import Batch
from gfmfr.federation.messages import ClientState, Hints, TrainInstruction, Upload
from gfmfr.federation.plugin import LossContext, LossTerm
from gfmfr.models.base import FederatedRecommender


def client_step(
    model: FederatedRecommender,
    cfg: FederationConfig,
    seed: int,
    client: int,
    positives: np.ndarray,
    state: ClientState,
    instruction: TrainInstruction,
    terms: tuple[LossTerm, ...] = (),
    catalogue: np.ndarray | None = None,
) -> tuple[ClientState, Upload]:
    """Train ``client`` for round ``instruction.round``; returns its new state and its upload.

    ``positives`` are the client's training items in its data's order; ``terms`` the plug-ins'
    client halves, one per entry of ``instruction.hints``; ``catalogue`` the items training knows,
    if not all (the cold-items split: negatives come from it).
    """
    kinds, specs = model.kinds, model.kinds.specs
    round_ = instruction.round

    # this round's examples: the positives, then num_negatives sampled negatives per positive
    negatives = client_negatives(positives, model.n_items, cfg.num_negatives, seed, client, round_, catalogue)
    items = torch.from_numpy(np.concatenate([positives, negatives]).astype(np.int64))
    labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])

    # local copies: shared parameters as the server sent them, private ones from the client's state
    start = {n: instruction.shared[n] for n in kinds.shared}
    start.update({n: state.params[n] for n in kinds.private_dense})
    for name in kinds.private_tables:  # held rows; every other row is zero
        kept, kept_rows = state.rows.get(name, (np.empty(0, np.int64), torch.empty(0, *specs[name].shape)))
        start[name] = torch.zeros(model.n_items, *specs[name].shape).index_copy_(0, torch.from_numpy(kept), kept_rows)
    leaves = {n: start[n].detach().clone().requires_grad_(n in kinds.trainable) for n in specs}
    opt = torch.optim.SGD(
        [{"params": [leaves[n]], "lr": specs[n].lr, "weight_decay": specs[n].weight_decay} for n in kinds.trainable]
    )
    scalars = [{k: torch.tensor([state.scalars.get(k, init)]) for k, init in t.state_init.items()} for t in terms]
    hints = [Hints.single(instruction.hints[k] if k < len(instruction.hints) else None) for k in range(len(terms))]
    metrics: dict[str, float] = {}

    # local epochs, each through the examples in a seeded order, in minibatches of batch_size
    total_loss, steps = 0.0, 0
    for epoch in range(cfg.local_epochs):
        order = torch.from_numpy(epoch_order(seed, client, round_, epoch, len(items)))
        for idx in order.split(cfg.batch_size):
            batch = Batch(np.array([client]), items[idx][None], labels[idx][None], torch.ones(1, len(idx)))
            p = {n: leaves[n][None] for n in kinds.dense}
            rows = {n: leaves[n][batch.items] for n in kinds.tables}
            logits = model.forward(p, rows)
            loss = model.base_loss(p, rows, logits, batch.labels, batch.mask, round_)
            base = loss.detach()
            for term, hint, own in zip(terms, hints, scalars):
                ctx = LossContext(model, p, rows, logits, base, batch, hint, own, {}, round_, cfg.batch_size)
                extra = term.loss(ctx)
                for k, v in ctx.figures.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v.sum())
                if extra is not None:
                    loss = loss + extra
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            total_loss += float(loss.detach().sum())
            steps += 1

    # the upload: shared parameters; of each item table only the rows this round used, with the
    # factor by which weight decay shrank every other row (the server knows those rows already)
    trained = {n: t.detach() for n, t in leaves.items()}
    used = np.unique(items.numpy())
    upload = Upload(
        client=client,
        shared={n: trained[n] for n in kinds.shared_dense},
        rows={n: trained[n][torch.from_numpy(used)] for n in kinds.shared_tables},
        row_item=used,
        decay={n: (1 - specs[n].lr * specs[n].weight_decay) ** steps for n in kinds.shared_tables},
        num_samples=len(items),
        loss=total_loss / max(steps, 1),
        signature=model.head_signature({n: trained[n][None] for n in model.head_params()})[0]
        if instruction.want_signature
        else None,
        metrics=metrics,
    )
    new_state = ClientState(
        params={n: trained[n] for n in kinds.private_dense},
        rows={},
        scalars={k: float(v[0]) for own in scalars for k, v in own.items()},
    )
    for name in kinds.private_tables:  # keep the non-zero rows only
        held = torch.nonzero(trained[name].flatten(1).ne(0).any(1)).flatten()
        new_state.rows[name] = (held.numpy(), trained[name][held])
    return new_state, upload
