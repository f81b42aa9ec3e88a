"""The sparse, batched client routine equals plain dense SGD with torch.optim on one client."""

import numpy as np
import pytest
import torch

from gfmfr.federation.aggregation import FedAvg
from gfmfr.federation.client import train_clients
from gfmfr.federation.reference import dense_train_client
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
    if round_:  # the client already holds private rows from an earlier round
        train_clients(model, fed.state, user, planted, cfg.federation, cfg.seed, round_ - 1)

    ref_all = dense_train_client(model, fed.state, 5, planted, cfg.federation, cfg.seed, round_)
    update = train_clients(model, fed.state, user, planted, cfg.federation, cfg.seed, round_)
    agg = FedAvg()
    old = dict(fed.state.shared)
    agg.add(update, old)
    new = agg.result(old)
    for n, s in specs.items():
        ref = ref_all[n]
        if s.shared:
            torch.testing.assert_close(new[n], ref if s.item_table else ref[0], rtol=1e-4, atol=1e-6)
        elif s.item_table:
            torch.testing.assert_close(fed.state.private_rows[n].dense(user)[0], ref, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(fed.state.private[n][5], ref[0], rtol=1e-4, atol=1e-6)
