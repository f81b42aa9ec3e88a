"""Server optimisers against hand-computed steps (Reddi et al., ICLR 2021, Algorithm 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gfmfr.config import from_dict
from gfmfr.federation.server_steps import FedAdam, FedAvgM, FedAvgOpt, FedYogi, build_server_optimizer


def two_rounds(opt, rows=None):
    x = {"w": torch.tensor([1.0, -2.0]), "t": torch.tensor([[0.5], [1.0], [-1.0]])}
    trained = {} if rows is None else {"t": rows}
    avg1 = {"w": torch.tensor([1.5, -2.5]), "t": torch.tensor([[0.7], [0.9], [-0.5]])}
    x1 = opt.step(x, avg1, trained)
    avg2 = {"w": x1["w"] + torch.tensor([0.2, 0.2]), "t": x1["t"] + 0.1}
    x2 = opt.step(x1, avg2, trained)
    return x1, x2


def test_fedavg_at_rate_one_is_the_average_bit_for_bit():
    x1, _ = two_rounds(FedAvgOpt(1.0))
    assert torch.equal(x1["w"], torch.tensor([1.5, -2.5]))


def test_fedavg_server_rate_scales_the_pseudo_gradient():
    x1, _ = two_rounds(FedAvgOpt(0.5))
    assert torch.allclose(x1["w"], torch.tensor([1.25, -2.25]))


def test_fedavgm_by_hand():
    x1, x2 = two_rounds(FedAvgM(lr=1.0, momentum=0.9))
    # m1 = d1 = [.5, -.5]; x1 = x + m1; m2 = .9 m1 + [.2, .2] = [.65, -.25]
    assert torch.allclose(x1["w"], torch.tensor([1.5, -2.5]))
    assert torch.allclose(x2["w"], x1["w"] + torch.tensor([0.65, -0.25]))


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_adaptive_by_hand(cls):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    _, x2 = two_rounds(cls(lr, b1, b2, tau))
    w, m, v = 1.0, 0.0, tau**2  # first coordinate of "w"
    for avg_offset in (0.5, 0.2):
        d = avg_offset
        m = b1 * m + (1 - b1) * d
        if cls is FedAdam:
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d)
        w = w + lr * m / (math.sqrt(v) + tau)
    assert x2["w"][0].item() == pytest.approx(w, rel=1e-5)


def test_untrained_rows_take_the_average_and_keep_their_state():
    rows = torch.tensor([True, False, True])
    opt = FedAdam(0.1, 0.9, 0.99, 1e-3)
    x1, x2 = two_rounds(opt, rows)
    # row 1 was trained by nobody: it is the FedAvg value, and its moments never moved
    assert torch.equal(x1["t"][1], torch.tensor([0.9]))
    assert torch.equal(x2["t"][1], x1["t"][1] + 0.1)
    assert opt.state["t"]["m"][1].item() == 0.0
    assert opt.state["t"]["v"][1].item() == pytest.approx(1e-6)
    # trained rows moved by the adaptive step, not to the average
    assert opt.state["t"]["m"][0].item() != 0.0
    assert not torch.allclose(x1["t"][0], torch.tensor([0.7]))


def test_constants_and_absent_parameters_are_left_alone():
    const = torch.ones(3, 2)
    opt = FedYogi(0.1, 0.9, 0.99, 1e-3)
    out = opt.step({"c": const}, {"c": const}, {})
    assert out["c"] is const and "c" not in opt.state


def test_config_builds_each_optimiser_and_rejects_unknown():
    for name, cls in [("fedavg", FedAvgOpt), ("fedavgm", FedAvgM), ("fedadam", FedAdam), ("fedyogi", FedYogi)]:
        assert isinstance(build_server_optimizer(from_dict({"federation": {"server_optimizer": name}}).federation), cls)
    with pytest.raises(ValueError, match="server_optimizer"):
        build_server_optimizer(from_dict({"federation": {"server_optimizer": "sgd"}}).federation)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_federation_trains_with_each_server_optimiser(planted, name):
    from gfmfr.federation.engine import Federation
    from gfmfr.models import build_model

    lr = 1.0 if name == "fedavgm" else 0.05
    cfg = from_dict(
        {
            "model": {"name": "fcf", "dim": 8},
            "seed": 0,
            "federation": {"rounds": 3, "local_epochs": 1, "server_optimizer": name, "server_lr": lr},
        }
    )
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    before = fed.state.shared["item"].clone()
    fed.fit()
    assert np.isfinite(fed.history[-1].loss)
    assert not torch.equal(before, fed.state.shared["item"])
    assert fed.server_opt.state["item"]["m"].abs().sum() > 0
