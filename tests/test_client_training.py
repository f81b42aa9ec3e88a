"""The sparse, batched client routine equals plain dense SGD with torch.optim on one client."""

from dataclasses import replace

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
@pytest.mark.parametrize("loss_average", ["batch", "nominal"])
def test_matches_dense_torch_sgd(planted, name, round_, loss_average):
    cfg = small_config(name, local_epochs=2, loss_average=loss_average)
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


@pytest.mark.parametrize("name", sorted(FEDERATED_MODELS))
def test_lazy_weight_decay_matches_dense_sgd_when_it_settles_mid_round(planted, name):
    """Strong decay (k = 1 - lr * wd = 0.5 on the item table) makes LazyDecay settle within the round."""
    cfg = small_config(name, local_epochs=15, batch_size=16)
    cfg = replace(cfg, model=replace(cfg.model, weight_decay=0.1))
    model = build_model(planted.n_items, cfg.model)
    fed = Federation(planted, model, cfg)
    user = np.array([5])
    from gfmfr.federation.client import LocalData

    assert LocalData(planted, user, cfg.federation, cfg.seed, 0).steps[0] > 25  # 0.5 ** 21 < 1e-6: settles
    ref_all = dense_train_client(model, fed.state, 5, planted, cfg.federation, cfg.seed, 0)
    update = train_clients(model, fed.state, user, planted, cfg.federation, cfg.seed, 0)
    table = model.item_table
    rows = torch.from_numpy(update.row_item)
    torch.testing.assert_close(update.rows[table], ref_all[table][rows], rtol=1e-4, atol=1e-6)
    for n, s in model.param_specs().items():
        if not s.item_table:
            got = update.shared[n][0] if s.shared else fed.state.private[n][5]
            torch.testing.assert_close(got, ref_all[n][0], rtol=1e-4, atol=1e-6)


def test_nominal_loss_average_weighs_a_partial_batch_by_its_fill(planted):
    """Client 5's last batch of an epoch is partial: 'nominal' shrinks that step, so parameters differ."""
    from gfmfr.federation.client import LocalData, batch_weight

    cfg = small_config("fcf", local_epochs=2)
    data = LocalData(planted, np.array([5]), cfg.federation, cfg.seed, 0)
    fills = [int(data.batch(s).mask.sum()) for s in range(len(data.active))]
    assert fills[-1] < cfg.federation.batch_size == fills[0]
    nominal = replace(cfg.federation, loss_average="nominal")
    weights = batch_weight(data.batch(len(data.active) - 1).mask, nominal)
    torch.testing.assert_close(weights, torch.tensor([fills[-1] / cfg.federation.batch_size]))
    users = {}
    for mode in ("batch", "nominal"):
        c = small_config("fcf", local_epochs=2, loss_average=mode)
        model = build_model(planted.n_items, c.model)
        fed = Federation(planted, model, c)
        train_clients(model, fed.state, np.array([5]), planted, c.federation, c.seed, 0)
        users[mode] = fed.state.private["user"][5]
    assert not torch.allclose(users["batch"], users["nominal"])
    with pytest.raises(ValueError, match="loss_average"):
        batch_weight(data.batch(0).mask, replace(cfg.federation, loss_average="sum"))


def test_decay_factor_out_of_range_is_rejected():
    from gfmfr.models.base import ParamSpec

    with pytest.raises(ValueError, match="lr \\* weight_decay"):
        ParamSpec((4,), shared=True, lr=100.0, weight_decay=0.01)


def test_prefetched_chunks_train_exactly_as_built_in_place(planted):
    """Data built ahead in a background thread (next chunk, next round) is the data built in place."""
    states = {}
    for prefetch in (False, True):
        cfg = small_config("fedrap", local_epochs=2)
        cfg = replace(cfg, federation=replace(cfg.federation, client_fraction=0.8, rounds=3),
                      runtime=replace(cfg.runtime, prefetch=prefetch, client_chunk=7))
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
