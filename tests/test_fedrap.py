import math

import pytest
import torch

from gfmfr.config import ModelConfig
from gfmfr.models.fedrap import FedRAP, ramp


def plain(d, c, mask, lam, mu, dim):
    n = mask.sum(1).clamp_min(1) * dim
    return (-lam * (((d - c) ** 2).sum(-1) * mask).sum(1) + mu * (c.abs().sum(-1) * mask).sum(1)) / n


def test_regulariser_value_and_gradient_match_plain_autograd():
    gen = torch.Generator().manual_seed(0)
    model = FedRAP(10, ModelConfig(name="fedrap", dim=4, fedrap_lambda=0.3, fedrap_mu=0.2))
    d = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(3, 5, generator=gen) > 0.3).double()
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    got = model.regularizer({}, {"D": d, "C": c}, mask, round_=7)
    ref = plain(d, c, mask, ramp(0.3, 7), ramp(0.2, 7), 4)
    torch.testing.assert_close(got, ref)
    g1 = torch.autograd.grad((got * weights).sum(), [d, c])
    g2 = torch.autograd.grad((ref * weights).sum(), [d, c])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda d, c: model.regularizer({}, {"D": d, "C": c}, mask, 7), (d, c))


def test_ramp_is_not_zeroed():
    assert ramp(0.1, 0) == 0 and ramp(0.1, 10) == 0.1 * math.tanh(1.0) and ramp(0.1, 100) > 0.0999


def test_unset_learning_rates_take_the_models_defaults():
    model = FedRAP(10, ModelConfig(name="fedrap"))
    assert (model.lr, model.item_lr, model.private_item_lr) == tuple(FedRAP.default_lrs.values())
    assert FedRAP(10, ModelConfig(name="fedrap", lr=0.7)).lr == 0.7


def test_a_private_table_that_cannot_learn_is_not_kept(planted):
    """With D_u's rate at 0 FedRAP keeps no D_u at all, and trains and scores as FedRAP
    whose private D_u barely moves (rate 1e-20: every C + D_u rounds to C)."""
    from dataclasses import replace

    from gfmfr.federation.engine import Federation
    from gfmfr.models import build_model
    from gfmfr.run import run
    from test_model_contract import small_config

    cfg = small_config("fedrap", rounds=4)
    still = replace(cfg, model=replace(cfg.model, private_item_lr=0.0))
    barely = replace(cfg, model=replace(cfg.model, private_item_lr=1e-20))
    fed = Federation(planted, build_model(planted.n_items, still.model), still)
    fed.train_round(0)
    assert "D" not in fed.model.param_specs() and "D" not in fed.state.private_rows
    assert "D" in build_model(planted.n_items, barely.model).param_specs()
    a, b = run(still, dataset=planted), run(barely, dataset=planted)
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-6)
    assert a["valid"] == pytest.approx(b["valid"]) and a["test"] == pytest.approx(b["test"])
