"""Bad uploads are rejected, and clients drop out."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from tests.test_model_contract import small_config

from gfmfr.federation import engine
from gfmfr.federation.engine import Federation
from gfmfr.federation.validation import keep_screened, screen, surviving, update_norms
from gfmfr.models import build_model


def test_update_norms_count_the_whole_item_table(planted):
    """The norm of a client's update equals the norm of its dense upload minus the broadcast."""
    from gfmfr.federation.batched import train_clients

    cfg = small_config("fcf")
    cfg = replace(cfg, model=replace(cfg.model, weight_decay=0.01))
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    shared = dict(fed.state.shared)
    update = train_clients(fed.model, fed.state, np.array([3, 8]), planted, cfg.federation, cfg.seed, 0)
    norms = update_norms(update, shared)
    for c in range(2):
        dense = shared["item"] * update.decay["item"][c]
        rows = update.row_client == c
        dense[torch.from_numpy(update.row_item[rows])] = update.rows["item"][torch.from_numpy(np.flatnonzero(rows))]
        assert norms[c] == pytest.approx(float((dense - shared["item"]).double().norm()), rel=1e-5)


def corrupting(fraction: float, seed: int = 0):
    """A stand-in for the batched step whose uploads, for a seeded ``fraction`` of clients, are NaN (half
    of them) or their update scaled by 1e3 (the other half)."""
    original = engine.train_clients

    def train_clients(model, state, users, dataset, cfg, seed_, round_, *args, **kwargs):
        shared = {n: t.clone() for n, t in state.shared.items()}
        update = original(model, state, users, dataset, cfg, seed_, round_, *args, **kwargs)
        bad = np.random.default_rng([seed, round_]).random(len(update.users)) < fraction
        for c in np.flatnonzero(bad):
            rows = torch.from_numpy(np.flatnonzero(update.row_client == c))
            for n, t in update.rows.items():
                start = shared[n][torch.from_numpy(update.row_item[rows.numpy()])]
                t[rows] = float("nan") if c % 2 else start + 1e3 * (t[rows] - start)
        return update

    return train_clients


def test_five_percent_of_bad_uploads_are_rejected_and_the_run_holds(planted, monkeypatch):
    """5% of clients send NaN or 1e3-scaled uploads every round: with screening the run ends where the
    clean run does; without it, it diverges or collapses."""
    cfg = small_config("fcf", rounds=12)
    cfg = replace(cfg, federation=replace(cfg.federation, early_stop_patience=0))
    clean = Federation(planted, build_model(planted.n_items, cfg.model), cfg).fit()
    monkeypatch.setattr(engine, "train_clients", corrupting(0.05))
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    screened = fed.fit()
    assert sum(h.rejected for h in fed.history) > 0 and all(np.isfinite(h.loss) for h in fed.history)
    assert abs(screened["valid"]["NDCG@10"] - clean["valid"]["NDCG@10"]) < 0.05
    open_door = replace(cfg, federation=replace(cfg.federation, reject_norm=None))
    try:
        unscreened = Federation(planted, build_model(planted.n_items, cfg.model), open_door).fit()
    except FloatingPointError:
        return  # diverged: what screening prevents
    assert unscreened["valid"]["NDCG@10"] < clean["valid"]["NDCG@10"] - 0.05


def test_screening_keeps_clean_clients_and_drops_outliers():
    from gfmfr.federation.messages import LocalUpdate

    g = torch.zeros(4, 2)
    rows = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0], [500.0, 0], [float("nan"), 0]])
    update = LocalUpdate(
        np.arange(5),
        {},
        {"t": rows},
        np.arange(5),
        np.zeros(5, np.int64),
        {"t": torch.ones(5)},
        np.ones(5),
        np.zeros(5),
    )
    cfg = small_config("fcf").federation
    assert screen(update, {"t": g}, replace(cfg, reject_norm=10.0)).tolist() == [True, True, True, False, False]
    assert screen(update, {"t": g}, replace(cfg, reject_norm=0.0)).tolist() == [True, True, True, True, False]
    assert screen(update, {"t": g}, replace(cfg, reject_norm=None)).all()
    # per local step: a client with 100 times the steps may move 100 times as far
    heavy = replace(update, num_samples=np.array([1, 1, 1, 5000, 1]))
    assert screen(heavy, {"t": g}, replace(cfg, reject_norm=10.0)).tolist() == [True, True, True, True, False]
    kept = LocalUpdate.concat([update], np.flatnonzero([True, False, True, False, False]))
    assert kept.users.tolist() == [0, 2] and kept.row_client.tolist() == [0, 1]
    torch.testing.assert_close(kept.rows["t"], rows[[0, 2]])
    kept, rejected = keep_screened(update, {"t": g}, replace(cfg, reject_norm=10.0))
    assert kept.users.tolist() == [0, 1, 2] and rejected == 2


def test_dropout_is_seeded_and_dropped_clients_keep_their_state(planted):
    users = np.arange(1000)
    a, b = surviving(users, 0.3, 0, 5), surviving(users, 0.3, 0, 5)
    assert np.array_equal(a, b) and 600 < len(a) < 800 and not np.array_equal(a, surviving(users, 0.3, 0, 6))
    cfg = small_config("fcf")
    cfg = replace(cfg, federation=replace(cfg.federation, dropout=0.5))
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    before = fed.state.private["user"].clone()
    log = fed.train_round(0)
    trained = surviving(np.arange(planted.n_users), 0.5, cfg.seed, 0)
    dropped = np.setdiff1d(np.arange(planted.n_users), trained)
    assert log.clients == len(trained) and len(dropped) > 0
    assert torch.equal(fed.state.private["user"][dropped], before[dropped])
    assert not torch.equal(fed.state.private["user"][trained], before[trained])
