"""One contract suite, run against every federated base model on a planted federation."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from gfmfr.config import from_dict
from gfmfr.federation.batched import train_clients
from gfmfr.federation.engine import Federation
from gfmfr.models import FEDERATED_MODELS, build_model
from gfmfr.run import run

MODELS = sorted(FEDERATED_MODELS)


def small_config(name: str, **fed):
    return from_dict(
        {
            "seed": 0,
            "model": {"name": name, "dim": 16, "hidden": [8], "lr": 0.5, "item_lr": 5.0, "private_item_lr": 0.05},
            "federation": {"rounds": 15, "local_epochs": 2, "batch_size": 32, "early_stop_patience": 0, **fed},
            "eval": {"ks": [10]},
        }
    )


@pytest.fixture(scope="module")
def popularity_hr(planted):
    return run(from_dict({"model": {"name": "popularity"}, "eval": {"ks": [10]}}), dataset=planted)["valid"]["HR@10"]


@pytest.mark.parametrize("name", MODELS)
def test_private_parameters_never_uploaded(planted, name):
    cfg = small_config(name)
    model = build_model(planted.n_items, cfg.model)
    fed = Federation(planted, model, cfg)
    update = train_clients(model, fed.state, np.arange(10), planted, cfg.federation, 0, 0)
    uploaded = set(update.shared) | set(update.rows)
    assert uploaded == set(model.shared_names())
    assert not uploaded & set(model.private_names())
    assert set(model.private_names()), "every base model keeps something private"
    assert model.upload_bytes() == sum(
        4 * int(np.prod(s.shape)) * (planted.n_items if s.item_table else 1)
        for s in model.param_specs().values()
        if s.shared
    )


@pytest.mark.parametrize("name", MODELS)
def test_learns_planted_structure(planted, popularity_hr, name):
    res = run(small_config(name), dataset=planted)
    losses = [h["loss"] for h in res["history"]]
    assert losses[-1] < losses[0]
    assert res["valid"]["HR@10"] > popularity_hr + 0.2, (res["valid"]["HR@10"], popularity_hr)


@pytest.mark.parametrize("name", MODELS)
def test_score_shapes(planted, name):
    cfg = small_config(name)
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    assert fed.state.score(np.arange(7)).shape == (7, planted.n_items)
    p = fed.state.client_params(np.arange(3))
    items = {n: torch.zeros(3, 5, cfg.model.dim) for n, s in fed.model.param_specs().items() if s.item_table}
    assert fed.model.forward(p, items).shape == (3, 5)
    assert fed.model.head_score(p, torch.zeros(3, 5, cfg.model.dim)).shape == (3, 5)
    assert fed.model.head_signature(p).shape[0] == 3


@pytest.mark.parametrize("name", MODELS)
def test_reproducible_with_seed(planted, name):
    cfg = small_config(name, rounds=3, client_fraction=0.5)
    a, b = run(cfg, dataset=planted), run(cfg, dataset=planted)
    assert a["valid"] == b["valid"] and [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    c = run(replace(cfg, seed=1), dataset=planted)
    assert [h["loss"] for h in c["history"]] != [h["loss"] for h in a["history"]]


def assert_batched_equals_one_client_at_a_time(data, model, cfg, plugins=(), rounds=2):
    """Rounds trained batched (in chunks and blocks) and with the one-client step, one client after
    another, give the same global parameters and client states (to float32 round-off, TOL)."""
    from tests.test_client_training import assert_same_states

    from gfmfr.federation.aggregation import RoundAggregate
    from gfmfr.federation.plugin import end_round, move_shared

    cfg = replace(cfg, runtime=replace(cfg.runtime, client_chunk=50, client_block=7))
    fed = Federation(data, model, cfg, plugins)
    fed.train_round(0)  # give FedRAP some private rows first, GFMFR its first preferences
    one = copy.deepcopy(fed)
    users = np.arange(data.n_users)
    for t in range(1, rounds):
        fed.train_round(t)
        agg = RoundAggregate(cfg.federation, one.plugins, one.state.shared, t)
        agg.add(one.train_one_by_one(users, t))
        one.state.shared, _ = agg.finish(one.server_opt)
        end_round(one.plugins, one.model, t, {})
        one.state.shared = move_shared(one.plugins, one.state.shared, t)
    assert_same_states(fed, one, users)


@pytest.mark.parametrize("name", MODELS)
def test_batched_equals_one_client_at_a_time(planted, name):
    """The in-process batched round and the per-client routine (a Flower ClientApp's) agree."""
    cfg = small_config(name)
    assert_batched_equals_one_client_at_a_time(planted, build_model(planted.n_items, cfg.model), cfg)


def test_rowdot_matches_einsum_and_its_gradient():
    from gfmfr.models.base import rowdot

    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(rowdot(vectors, weight), torch.einsum("abd,ad->ab", vectors, weight))
    assert torch.autograd.gradcheck(rowdot, (vectors, weight))
    # a non-contiguous weight (FedNCF passes a column slice of its output layer)
    wide = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: rowdot(v, w[:, 3:]), (vectors, wide))
    # one table broadcast to every client (evaluation's scoring): the matrix-product path
    table = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(rowdot(table.expand(3, 5, 4), weight), torch.einsum("bd,ad->ab", table, weight))
    assert torch.autograd.gradcheck(lambda t, w: rowdot(t.expand(3, 5, 4), w), (table, weight))
