"""The privacy audit's attacks work where they should and fail where noise hides the signal."""

import numpy as np
import torch
from tests.test_model_contract import small_config

from gfmfr.config import PrivacyConfig
from gfmfr.federation.batched import train_clients
from gfmfr.federation.engine import Federation
from gfmfr.models import build_model
from gfmfr.privacy import audit
from gfmfr.privacy.dp import privatise


def audited(planted, rounds=3):
    cfg = small_config("fcf")
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    for t in range(rounds):
        fed.train_round(t)
    shared = {n: v.clone() for n, v in fed.state.shared.items()}
    update = train_clients(
        fed.model,
        fed.state,
        np.arange(planted.n_users),
        planted,
        cfg.federation,
        cfg.seed,
        rounds,
        want_signatures=True,
    )
    return fed, shared, update


def mean_auc(planted, update, shared, attack):
    g = shared["item"]
    aucs = []
    for i, user in enumerate(update.users):
        up = update.upload(i)
        delta = audit.change(audit.dense_table(up.rows["item"], up.row_item, up.decay["item"], g), g)
        aucs.append(audit.attack_figures(attack(up, delta), planted.user_train(int(user)))[0])
    return float(np.mean(aucs))


def test_attacks_recover_positives_from_plain_uploads_and_not_from_local_dp(planted):
    fed, shared, update = audited(planted)
    n = planted.n_items

    def direction_on_sent(up, delta):
        sent = np.zeros(n, bool)
        sent[up.row_item] = True
        return audit.score_direction(delta, sent)

    assert (
        mean_auc(planted, update, shared, lambda up, d: audit.score_rows(up.row_item, n)) > 0.6
    )  # 4 negatives a positive cover most of 60 items
    assert mean_auc(planted, update, shared, direction_on_sent) > 0.95
    assert mean_auc(planted, update, shared, lambda up, d: audit.score_direction(d)) > 0.9  # dense: same signal
    noisy = privatise(update, shared, PrivacyConfig(mode="local", clip=1.0), 50.0, 0, 3)
    assert abs(mean_auc(planted, noisy, shared, lambda up, d: audit.score_direction(d)) - 0.5) < 0.08


def test_signature_attack_reads_the_user_vector_and_noise_hides_it(planted):
    fed, shared, update = audited(planted, rounds=10)
    g = shared["item"]

    def sig_auc(signatures):
        return np.mean(
            [
                audit.attack_figures(audit.score_signature(fed.model, signatures[i], g), planted.user_train(int(u)))[0]
                for i, u in enumerate(update.users)
            ]
        )

    assert sig_auc(update.signatures) > 0.8
    noised = privatise(update, shared, PrivacyConfig(signature_clip=1.0, signature_noise=100.0), None, 0, 10)
    assert abs(sig_auc(noised.signatures) - 0.5) < 0.08
    assert torch.isfinite(noised.signatures).all()
