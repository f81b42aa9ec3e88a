"""The sparse, batched client routine equals plain dense SGD with torch.optim on one client."""

import numpy as np
import pytest
import torch

from gfmfr.federation.aggregation import FedAvg
from gfmfr.federation.client import LocalData, train_clients
from gfmfr.federation.engine import Federation
from gfmfr.models import FEDERATED_MODELS, build_model
from tests.test_model_contract import small_config


@pytest.mark.parametrize("name", sorted(FEDERATED_MODELS))
@pytest.mark.parametrize("round_", [0, 3])
def test_matches_dense_torch_sgd(planted, name, round_):
    cfg = small_config(name, local_epochs=2)
    model = build_model(planted.n_items, cfg.model)
    fed = Federation(planted, model, cfg)
    user = np.array([5])
    specs = model.param_specs()

    # reference: full dense tables, autograd, torch.optim.SGD with one group per parameter
    params = {n: t.clone() for n, t in fed.state.client_params(user).items()}
    for n, s in specs.items():
        if s.item_table:
            params[n] = (fed.state.shared[n].clone() if s.shared else fed.state.private_rows[n].dense(user)[0])
    leaves = {n: t.requires_grad_() for n, t in params.items()}
    opt = torch.optim.SGD([{"params": [t], "lr": specs[n].lr, "weight_decay": specs[n].weight_decay}
                           for n, t in leaves.items()])
    data = LocalData(planted, user, np.empty(0, np.int64), cfg.federation, cfg.seed, round_)
    for s in range(len(data.active)):
        _, batch, _ = data.batch(s)
        opt.zero_grad()
        items = {n: leaves[n][batch.items] for n, sp in specs.items() if sp.item_table}
        p = {n: t for n, t in leaves.items() if not specs[n].item_table}
        logits = model.forward(p, items)
        model.base_loss(p, items, logits, batch.labels, batch.mask, round_).sum().backward()
        opt.step()

    update = train_clients(model, fed.state, user, planted, cfg.federation, cfg.seed, round_)
    agg = FedAvg()
    old = dict(fed.state.shared)
    agg.add(update, old)
    new = agg.result(old)
    for n, s in specs.items():
        ref = leaves[n].detach()
        if s.shared:
            torch.testing.assert_close(new[n], ref if s.item_table else ref[0], rtol=1e-4, atol=1e-6)
        elif s.item_table:
            torch.testing.assert_close(fed.state.private_rows[n].dense(user)[0], ref, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(fed.state.private[n][5], ref[0], rtol=1e-4, atol=1e-6)
