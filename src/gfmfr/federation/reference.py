"""Plain dense PyTorch training of one client: the correctness oracle and the naive baseline.

This is how a straightforward implementation (and the GFMFR reference code) trains a client:
full copies of every item table, autograd through an embedding lookup, ``torch.optim.SGD``
with one parameter group per parameter. It runs the client's minibatches in the same order
as :func:`gfmfr.federation.client.train_clients`, so the two must agree to float tolerance
(tests/test_client_training.py); ``benchmarks/engine_speed.py`` times a round of it, one
client after another, as the naive baseline. Nothing trains through this module.
"""

from __future__ import annotations

import numpy as np
import torch

from gfmfr.config import FederationConfig
from gfmfr.data.dataset import Dataset
from gfmfr.federation.client import LocalData
from gfmfr.federation.state import FederationState
from gfmfr.models.base import FederatedRecommender, Params


def dense_train_client(
    model: FederatedRecommender, state: FederationState, user: int, dataset: Dataset, cfg: FederationConfig,
    seed: int, round_: int, train_keys: np.ndarray | None = None,
) -> Params:
    """One client's parameters after local training: per-client tensors [1, ...], item tables [n_items, ...]."""
    specs = model.param_specs()
    users = np.array([user])
    params = {n: t.clone() for n, t in state.client_params(users).items()}
    for n, s in specs.items():
        if s.item_table:
            params[n] = state.shared[n].clone() if s.shared else state.private_rows[n].dense(users)[0]
    leaves = {n: t.requires_grad_(specs[n].trainable) for n, t in params.items()}
    opt = torch.optim.SGD([{"params": [t], "lr": specs[n].lr, "weight_decay": specs[n].weight_decay}
                           for n, t in leaves.items() if specs[n].trainable])
    data = LocalData(dataset, users, cfg, seed, round_, train_keys)
    for s in range(len(data.active)):
        batch = data.batch(s)
        opt.zero_grad()
        items = {n: leaves[n][batch.items] for n, sp in specs.items() if sp.item_table}
        p = {n: t for n, t in leaves.items() if not specs[n].item_table}
        logits = model.forward(p, items)
        loss = model.base_loss(p, items, logits, batch.labels, batch.mask, round_)
        if cfg.loss_average == "nominal":  # every pair weighs 1 / batch_size, whatever the batch's fill
            loss = loss * batch.mask.sum() / cfg.batch_size
        loss.sum().backward()
        opt.step()
    return {n: t.detach() for n, t in leaves.items()}
