"""The batched engine equals the one-client step (plain dense SGD with torch.optim, one client)."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from tests.test_model_contract import small_config

from gfmfr.federation.aggregation import FedAvg
from gfmfr.federation.batched import train_clients
from gfmfr.federation.engine import Federation
from gfmfr.models import FEDERATED_MODELS, build_model

TOL = {"rtol": 1e-4, "atol": 3e-5}
"""Float32 sums in another order: GFMFR-FCF's user vectors differ by up to 1.2e-5 after 4 rounds."""


def assert_same_states(a, b, users):
    """Two federations hold the same private state for ``users`` (and the same shared parameters)."""
    for n, value in a.state.shared.items():
        torch.testing.assert_close(b.state.shared[n], value, **TOL)
    for u in users:
        x, y = a.state.load(int(u)), b.state.load(int(u))
        for n, value in x.params.items():
            torch.testing.assert_close(y.params[n], value, **TOL)
        for n, (items, rows) in x.rows.items():
            dense = torch.zeros(a.model.n_items, *rows.shape[1:])
            dense[torch.from_numpy(items)] = rows
            other = torch.zeros_like(dense)
            other[torch.from_numpy(y.rows[n][0])] = y.rows[n][1]
            torch.testing.assert_close(other, dense, **TOL)
        assert x.scalars.keys() == y.scalars.keys()
        for k, v in x.scalars.items():
            assert v == pytest.approx(y.scalars[k], rel=1e-5, nan_ok=True)


def assert_uploads_agree(batched, one, shared):
    """The same uploads: FedAvg of either gives the same global parameters, per-client figures agree."""
    means = []
    for update in (batched, one):
        agg = FedAvg()
        agg.add(update, shared)
        means.append(agg.result(shared))
    for n, value in means[0].items():
        torch.testing.assert_close(means[1][n], value, **TOL)
    order = np.argsort(batched.users)
    assert (np.sort(one.users) == batched.users[order]).all()
    np.testing.assert_allclose(one.loss[np.argsort(one.users)], batched.loss[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(one.num_samples[np.argsort(one.users)], batched.num_samples[order])
    for k, v in batched.metrics.items():
        np.testing.assert_allclose(one.metrics[k][np.argsort(one.users)], v[order], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FEDERATED_MODELS))
@pytest.mark.parametrize("round_", [0, 3])
def test_batched_matches_the_one_client_step(planted, name, round_):
    cfg = small_config(name, local_epochs=2)
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    users = np.array([5, 11, 2])
    if round_:  # the clients already hold private rows from an earlier round
        train_clients(fed.model, fed.state, users, planted, cfg.federation, cfg.seed, round_ - 1)
    one = copy.deepcopy(fed)
    update = train_clients(fed.model, fed.state, users, planted, cfg.federation, cfg.seed, round_, want_signatures=True)
    uploads = one.train_one_by_one(users, round_, want_signatures=True)
    assert_uploads_agree(update, uploads, fed.state.shared)
    assert_same_states(fed, one, users)
    torch.testing.assert_close(
        uploads.signatures[np.argsort(uploads.users)], update.signatures[np.argsort(update.users)], **TOL
    )


@pytest.mark.parametrize("name", sorted(FEDERATED_MODELS))
def test_lazy_weight_decay_matches_dense_sgd_when_it_settles_mid_round(planted, name):
    """Strong decay (k = 1 - lr * wd = 0.5 on the item table) makes LazyDecay settle within the round."""
    cfg = small_config(name, local_epochs=15, batch_size=16)
    cfg = replace(cfg, model=replace(cfg.model, weight_decay=0.1))
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    user = np.array([5])
    from gfmfr.federation.batched import LocalData

    assert LocalData(planted, user, cfg.federation, cfg.seed, 0).steps[0] > 25  # 0.5 ** 21 < 1e-6: settles
    one = copy.deepcopy(fed)
    update = train_clients(fed.model, fed.state, user, planted, cfg.federation, cfg.seed, 0)
    uploads = one.train_one_by_one(user, 0)
    table = fed.model.item_table
    np.testing.assert_array_equal(update.row_item, uploads.row_item)
    torch.testing.assert_close(update.rows[table], uploads.rows[table], rtol=1e-4, atol=1e-6)
    assert_same_states(fed, one, user)


def test_decay_factor_out_of_range_is_rejected():
    from gfmfr.models.base import ParamSpec

    with pytest.raises(ValueError, match="lr \\* weight_decay"):
        ParamSpec((4,), shared=True, lr=100.0, weight_decay=0.01)


def test_prefetched_chunks_train_exactly_as_built_in_place(planted):
    """Data built ahead in a background thread (next chunk, next round) is the data built in place."""
    states = {}
    for prefetch in (False, True):
        cfg = small_config("fedrap", local_epochs=2)
        cfg = replace(
            cfg,
            federation=replace(cfg.federation, client_fraction=0.8, rounds=3),
            runtime=replace(cfg.runtime, prefetch=prefetch, client_chunk=7),
        )
        model = build_model(planted.n_items, cfg.model)
        fed = Federation(planted, model, cfg)
        for t in range(3):
            fed.train_round(t)
            if prefetch and t < 2:  # the first chunk of the next round is already under way
                assert fed._ahead is not None and fed._ahead[0] == (t + 1, 0)
        states[prefetch] = fed.state
    for n, value in states[False].shared.items():
        assert torch.equal(states[True].shared[n], value)
    for n, value in states[False].private.items():
        assert torch.equal(states[True].private[n], value)
    users = np.arange(planted.n_users)
    assert torch.equal(states[True].score(users), states[False].score(users))


def test_early_stopping_counts_rounds_whatever_the_validation_cadence(planted):
    """Patience is in rounds: with validation every 3 rounds and patience 6, the run stops at the
    first validation 6 or more rounds after the best one, and never between validations."""
    cfg = small_config("fcf")
    cfg = replace(cfg, federation=replace(cfg.federation, rounds=60, eval_every=3, early_stop_patience=6))
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    best = fed.fit()
    validated = [h.round for h in fed.history if h.valid is not None]
    assert validated == list(range(2, len(fed.history), 3))  # rounds 2, 5, 8, ...
    last = fed.history[-1].round
    assert last in validated and last < 59
    assert last - best["round"] >= 6 and last - 3 - best["round"] < 6


def test_best_round_selection_reads_test_only_at_a_new_best():
    from gfmfr.eval.selection import BestRound

    best = BestRound("NDCG@10", patience=3)
    reads = []
    for t, score in enumerate([0.1, 0.3, 0.2, 0.3, 0.25]):
        best.update(t, {"NDCG@10": score}, lambda t=t: reads.append(t) or {"NDCG@10": t})
    assert reads == [0, 1] and best.round == 1 and best.test == {"NDCG@10": 1}  # a tie is not a new best
    assert not best.stop(3) and best.stop(4)
    assert not BestRound("NDCG@10", patience=0).stop(10**6)
