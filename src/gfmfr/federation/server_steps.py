"""Server optimisers on the aggregated pseudo-gradient (Reddi et al., ICLR 2021, "Adaptive
Federated Optimization", Algorithm 2).

After FedAvg, the server holds the mean ``avg`` of the participants' shared parameters; the
pseudo-gradient is ``delta = avg - x`` (the FedAvg step, as a direction of ascent). A server
optimiser turns it into the next global parameters; every variant overrides one hook,
:meth:`ServerOptimizer.direction`, which maps ``delta`` to the step to add given the
variant's state (FedAvg: the step itself, so ``x + delta = avg`` exactly).

Item tables are optimised row-wise: a row that no participant trained this round (it only
shrank by weight decay) takes the FedAvg value and keeps its optimiser state, so momentum and
second moments of rarely sampled items are not washed out by rounds in which nobody saw them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from gfmfr.config import FederationConfig
from gfmfr.models.base import Params

State = dict[str, torch.Tensor]


class ServerOptimizer(ABC):
    """Next global parameters from the current ones and the participants' average."""

    def __init__(self, lr: float):
        self.lr = lr
        """Server learning rate eta."""
        self.state: dict[str, State] = {}
        """Per parameter: the variant's moment tensors, shaped like the parameter."""

    @abstractmethod
    def direction(self, delta: torch.Tensor, state: State) -> torch.Tensor:
        """The step to add for pseudo-gradient ``delta`` (one parameter, or its trained rows), updating
        ``state`` (same rows) in place."""

    def init_state(self, param: torch.Tensor) -> State:
        """Fresh moment tensors for ``param`` (none by default)."""
        return {}

    def step(self, current: Params, averaged: Params, trained_rows: dict[str, torch.Tensor]) -> Params:
        """The next global parameters. ``trained_rows[name]`` (bool [n_items]) marks the rows of item
        table ``name`` that some participant trained; a name not in it is updated whole. A name
        absent from ``averaged`` or equal to it (constants, nobody took part) is left as it is."""
        out: Params = {}
        for name, x in current.items():
            avg = averaged.get(name, x)
            if avg is x:
                out[name] = x
                continue
            state = self.state.setdefault(name, self.init_state(x))
            rows = trained_rows.get(name)
            if rows is None:
                out[name] = x + self.lr * self.direction(avg - x, state)
                continue
            idx = torch.nonzero(rows).squeeze(1)
            sub = {k: v.index_select(0, idx) for k, v in state.items()}
            step = self.direction(avg.index_select(0, idx) - x.index_select(0, idx), sub)
            for k, v in sub.items():
                state[k].index_copy_(0, idx, v)
            new = avg.clone()
            new.index_copy_(0, idx, x.index_select(0, idx) + self.lr * step)
            out[name] = new
        return out


class FedAvgOpt(ServerOptimizer):
    """FedAvg with a server learning rate: ``x + eta * delta`` (eta = 1: the plain average)."""

    def step(self, current: Params, averaged: Params, trained_rows: dict[str, torch.Tensor]) -> Params:
        if self.lr == 1:  # the average itself, bit for bit
            return {name: averaged.get(name, x) for name, x in current.items()}
        return super().step(current, averaged, trained_rows)

    def direction(self, delta: torch.Tensor, state: State) -> torch.Tensor:
        return delta


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al., 2019): ``m = beta m + delta``, step ``eta m``."""

    def __init__(self, lr: float, momentum: float):
        super().__init__(lr)
        self.momentum = momentum

    def init_state(self, param: torch.Tensor) -> State:
        return {"m": torch.zeros_like(param)}

    def direction(self, delta: torch.Tensor, state: State) -> torch.Tensor:
        state["m"].mul_(self.momentum).add_(delta)
        return state["m"]


class _Adaptive(ServerOptimizer):
    """Shared part of FedAdam and FedYogi: ``m = b1 m + (1 - b1) delta``, step ``eta m / (sqrt(v) + tau)``,
    no bias correction, ``v`` starting at ``tau ** 2`` (Reddi et al., Algorithm 2)."""

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float):
        super().__init__(lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def init_state(self, param: torch.Tensor) -> State:
        return {"m": torch.zeros_like(param), "v": torch.full_like(param, self.tau**2)}

    @abstractmethod
    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        """The next ``v`` from the current one and ``delta ** 2``."""

    def direction(self, delta: torch.Tensor, state: State) -> torch.Tensor:
        state["m"].mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        state["v"].copy_(self.second_moment(state["v"], delta * delta))
        return state["m"] / (state["v"].sqrt() + self.tau)


class FedAdam(_Adaptive):
    """Adam on the server: ``v = b2 v + (1 - b2) delta^2``."""

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * sq


class FedYogi(_Adaptive):
    """Yogi on the server: ``v = v - (1 - b2) delta^2 sign(v - delta^2)`` (additive, slower-growing)."""

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * sq * torch.sign(v - sq)


SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


def build_server_optimizer(cfg: FederationConfig) -> ServerOptimizer:
    """The server optimiser ``cfg.server_optimizer`` names, with its settings."""
    lr = cfg.server_lr
    if cfg.server_optimizer == "fedavg":
        return FedAvgOpt(lr)
    if cfg.server_optimizer == "fedavgm":
        return FedAvgM(lr, cfg.server_momentum)
    if cfg.server_optimizer == "fedadam":
        return FedAdam(lr, cfg.server_momentum, cfg.server_beta2, cfg.server_tau)
    if cfg.server_optimizer == "fedyogi":
        return FedYogi(lr, cfg.server_momentum, cfg.server_beta2, cfg.server_tau)
    raise ValueError(f"federation.server_optimizer must be one of {SERVER_OPTIMIZERS}, got {cfg.server_optimizer!r}")
