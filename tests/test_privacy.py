"""Differential privacy: clipping, noise, accounting, stopping at a target epsilon."""

from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
import torch
from tests.test_model_contract import small_config

from gfmfr.config import ConfigError, PrivacyConfig, apply_overrides, from_dict
from gfmfr.federation.aggregation import FedAvg
from gfmfr.federation.batched import train_clients
from gfmfr.federation.engine import Federation, sample_clients
from gfmfr.federation.validation import update_norms
from gfmfr.models import build_model
from gfmfr.privacy.accounting import PrivacyLedger, RoundReleases, accountant
from gfmfr.privacy.dp import CentralNoise, add_local_noise, clip_updates, privatise
from gfmfr.run import run


def with_privacy(cfg, **privacy):
    return replace(cfg, privacy=replace(cfg.privacy, **privacy))


def one_round(planted, name="fcf", users=None):
    users = np.arange(10) if users is None else users
    cfg = small_config(name)
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    shared = {n: t.clone() for n, t in fed.state.shared.items()}
    return fed, shared, train_clients(fed.model, fed.state, users, planted, cfg.federation, cfg.seed, 0)


@pytest.mark.parametrize("name", ["fcf", "fedncf"])
def test_clipping_bounds_each_whole_update_and_keeps_its_direction(planted, name):
    fed, shared, update = one_round(planted, name)
    norms = update_norms(update, shared)
    clip = float(np.median(norms))
    clipped = clip_updates(update, shared, clip)
    after = update_norms(clipped, shared)
    assert np.all(after <= clip * (1 + 1e-4))
    assert np.allclose(after, np.minimum(norms, clip), rtol=1e-4)
    for c in range(len(update.users)):  # the clipped update is the update scaled by min(1, clip / norm)
        scale = min(1.0, clip / norms[c])
        a, b = update.upload(c), clipped.upload(c)
        for n in a.rows:
            g = shared[n][torch.from_numpy(a.row_item)]
            assert torch.allclose(b.rows[n] - g, scale * (a.rows[n] - g), atol=1e-6)
            assert b.decay[n] - 1 == pytest.approx(scale * (a.decay[n] - 1), abs=1e-7)
        for n in a.shared:
            assert torch.allclose(b.shared[n] - shared[n], scale * (a.shared[n] - shared[n]), atol=1e-6)


def test_local_noise_makes_dense_uploads_seeded_per_client(planted):
    fed, shared, update = one_round(planted)
    quiet = add_local_noise(update, shared, 0.0, seed=0, round_=0)
    n = planted.n_items
    assert len(quiet.row_item) == n * len(update.users) and np.all(quiet.decay["item"].numpy() == 1)
    agg_rows, agg_dense = FedAvg(), FedAvg()  # no noise: the same average as the rows
    agg_rows.add(update, shared)
    agg_dense.add(quiet, shared)
    assert torch.allclose(agg_rows.result(shared)["item"], agg_dense.result(shared)["item"], atol=1e-6)
    noisy = add_local_noise(update, shared, 0.5, seed=0, round_=0)
    noise = noisy.rows["item"] - quiet.rows["item"]
    assert float(noise.std()) == pytest.approx(0.5, rel=0.05)

    # a client's noise depends on (seed, round, client) only, not on who trains with it
    def noise_of(users):
        up = train_clients(fed.model, fed.state, users, planted, fed.cfg.federation, 0, 1)
        pos = int(np.flatnonzero(up.users == 3)[0])
        diff = add_local_noise(up, shared, 0.5, 0, 0).rows["item"] - add_local_noise(up, shared, 0.0, 0, 0).rows["item"]
        return diff[pos * n : (pos + 1) * n]

    assert torch.allclose(noise_of(np.array([3])), noise_of(np.array([1, 3, 7])), atol=1e-6)


def test_central_noise_without_noise_is_fedavg(planted):
    fed, shared, update = one_round(planted)
    agg = FedAvg()
    agg.add(update, shared)
    names = ("item",)
    same = CentralNoise(1.0, 0.0, agg.total, names, 0).average(agg.sums, agg.total, shared, 0)
    assert torch.allclose(same["item"], agg.result(shared)["item"], atol=1e-6)
    noisy = CentralNoise(1.0, 0.1, agg.total, names, 0).average(agg.sums, agg.total, shared, 0)
    assert float((noisy["item"] - same["item"]).std() * agg.total) == pytest.approx(0.1, rel=0.05)


def test_ledger_is_dp_accounting_and_calibration_spends_the_target():
    p = PrivacyConfig(mode="central", noise_multiplier=2.0)
    ledger = PrivacyLedger(p, 1000, 0.1, 50, lambda t: RoundReleases())
    for t in range(50):
        eps = ledger.spend(t)
    direct = accountant()
    direct.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(2.0)), 50
        )
    )
    assert eps == pytest.approx(direct.get_epsilon(1 / 1000**1.1), rel=1e-9)
    calibrated = PrivacyLedger(
        replace(p, noise_multiplier=None, target_epsilon=3.0), 1000, 1.0, 40, lambda t: RoundReleases()
    )
    for t in range(40):
        assert not calibrated.would_exceed(t)
        eps = calibrated.spend(t)
    assert eps == pytest.approx(3.0, rel=0.01) and calibrated.would_exceed(40)
    # a round that also releases two group sums and a noised signature spends more
    more = PrivacyLedger(replace(p, signature_noise=4.0), 1000, 1.0, 10, lambda t: RoundReleases(2, True))
    less = PrivacyLedger(p, 1000, 1.0, 10, lambda t: RoundReleases())
    base = less.spend(0)
    assert more.spend(0) > base
    local = PrivacyLedger(replace(p, mode="local"), 1000, 1.0, 10, lambda t: RoundReleases())
    assert local.spend(0) > base  # sensitivity 2C


def test_a_central_dp_run_reports_epsilon_and_stops_at_the_target(planted):
    cfg = small_config("fcf", rounds=30)
    cfg = with_privacy(cfg, mode="central", noise_multiplier=1.0, target_epsilon=20.0, clip=1.0)
    res = run(cfg, dataset=planted)
    eps = [h["epsilon"] for h in res["history"]]
    assert 1 < len(eps) < 30 and all(np.diff(eps) > 0) and eps[-1] <= 20.0
    ledger = PrivacyLedger(cfg.privacy, planted.n_users, 1.0, 30, lambda t: RoundReleases())
    for t in range(len(eps)):
        ledger.spend(t)
    assert ledger.would_exceed(len(eps))  # it stopped because the next round would pass the target
    again = run(cfg, dataset=planted)
    assert again["history"][-1]["valid"] == res["history"][-1]["valid"]  # seeded noise: reproducible


def test_dp_noise_hurts_and_no_noise_matches_clipping_alone(planted):
    """Tiny noise is nearly the non-private run; huge noise destroys what the model learns."""
    base = small_config("fcf", rounds=10)
    clean = run(base, dataset=planted)["valid"]["NDCG@10"]
    small = run(with_privacy(base, mode="central", noise_multiplier=1e-4, clip=1e3), dataset=planted)
    large = run(with_privacy(base, mode="central", noise_multiplier=100.0, clip=1e3), dataset=planted)
    assert small["valid"]["NDCG@10"] == pytest.approx(clean, abs=0.02)
    assert large["valid"]["NDCG@10"] < clean - 0.1


def test_local_dp_run_and_batched_equals_one_by_one(planted):
    cfg = with_privacy(small_config("fcf", rounds=3), mode="local", noise_multiplier=0.01, clip=5.0)
    a = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    b = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    users = np.arange(planted.n_users)
    shared = {n: t.clone() for n, t in a.state.shared.items()}
    batched = a.privatise(train_clients(a.model, a.state, users, planted, cfg.federation, cfg.seed, 0), 0)
    single = b.train_one_by_one(users, 0)
    order = np.argsort(batched.users)
    assert np.array_equal(batched.users[order], single.users)
    for i, j in enumerate(order):
        assert torch.allclose(batched.upload(int(j)).rows["item"], single.upload(i).rows["item"], atol=1e-4)
    res = run(cfg, dataset=planted)
    assert len(res["history"]) == 3 and res["history"][-1]["epsilon"] > 0
    del shared


def test_poisson_sampling_under_dp_is_seeded():
    a = sample_clients(1000, 0.1, 0, 3, poisson=True)
    assert np.array_equal(a, sample_clients(1000, 0.1, 0, 3, poisson=True))
    sizes = {len(sample_clients(1000, 0.1, 0, t, poisson=True)) for t in range(10)}
    assert len(sizes) > 1 and all(60 < s < 140 for s in sizes)


def test_signature_noise_clips_and_noises_each_signature(planted):
    fed, shared, _ = one_round(planted)
    update = train_clients(fed.model, fed.state, np.arange(20), planted, fed.cfg.federation, 0, 1, want_signatures=True)
    raw = update.signatures.clone()
    p = PrivacyConfig(signature_clip=0.01, signature_noise=1e-9)
    out = privatise(update, shared, p, None, 0, 1).signatures
    assert torch.all(torch.linalg.vector_norm(out, dim=1) <= 0.01 * (1 + 1e-4))
    assert torch.allclose(out / out.norm(dim=1, keepdim=True), raw / raw.norm(dim=1, keepdim=True), atol=1e-4)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"privacy": {"mode": "central"}}, "needs noise_multiplier or target_epsilon"),
        ({"privacy": {"mode": "central", "noise_multiplier": 1}, "plugin": "gfmfr"}, "signature_noise"),
        (
            {"privacy": {"mode": "central", "noise_multiplier": 1}, "federation": {"weighted_aggregation": True}},
            "weighted_aggregation",
        ),
        ({"privacy": {"clip": 0}}, "privacy.clip"),
        ({"privacy": {"mode": "laplace"}}, "privacy.mode"),
    ],
)
def test_dp_settings_that_cannot_work_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(apply_overrides(bad, []))


def test_gfmfr_under_central_dp_noises_its_group_sums(planted):
    from tests.test_gfmfr import gfmfr_config, gfmfr_federation

    cfg = gfmfr_config("fcf")
    cfg = with_privacy(cfg, mode="central", noise_multiplier=1.0, clip=5.0, signature_noise=0.5)
    fed, server = gfmfr_federation(planted, cfg)
    assert server.noise is not None and server.noise.std == pytest.approx(5.0)
    fed.fit()
    assert np.isfinite(fed.history[-1].loss) and fed.history[-1].epsilon > fed.history[0].epsilon
    assert server.targets is not None and torch.isfinite(server.targets).all()
