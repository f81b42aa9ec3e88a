"""The privacy spent by a run, (epsilon, delta), with Google's ``dp-accounting`` (RDP accountant).

Each round releases (``privacy.mode = "central"``) the noised sum of the sampled clients' clipped
updates: a Gaussian mechanism of noise multiplier sigma, Poisson-sampled at rate
``client_fraction`` (amplified), under add-or-remove-one-client adjacency; plus, in a plug-in's
server rounds, its own noised sums (GFMFR: each group's sum of updates and its size, two more).
In ``local`` mode each participating client's own noised update is a Gaussian mechanism of
sensitivity 2C, composed over every round without amplification (the server sees who sends).
A noised head signature is a Gaussian mechanism of sensitivity 2 ``signature_clip``, likewise.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import dp_accounting
from absl import logging as absl_logging

from gfmfr.config import ConfigError, PrivacyConfig

absl_logging.set_verbosity(absl_logging.ERROR)  # dp-accounting's per-order convergence chatter

ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 512, 1024)
"""RDP orders: integers only, where the sampled Gaussian has a closed form (fractional orders are
slower and may not converge); fewer orders give a valid, slightly looser bound."""

log = logging.getLogger(__name__)


def accountant() -> dp_accounting.rdp.RdpAccountant:
    """A fresh RDP accountant over :data:`ORDERS`, add-or-remove-one adjacency."""
    return dp_accounting.rdp.RdpAccountant(list(ORDERS))


@dataclass(frozen=True)
class RoundReleases:
    """What a round releases beyond the federation's noised average."""

    extra_sums: int = 0
    """More noised sums of clipped updates (or of counts, sensitivity 1) at the same sigma: GFMFR's
    group sums and group sizes in a server round (central mode; post-processing in local mode)."""
    signatures: bool = False
    """Whether clients upload a noised head signature this round."""


def default_delta(n_clients: int) -> float:
    """1 / clients^1.1: below 1 / clients, as delta must be."""
    return 1.0 / n_clients**1.1


def round_event(cfg: PrivacyConfig, sigma: float, q: float, releases: RoundReleases) -> dp_accounting.DpEvent:
    """The DP event of one round."""
    events: list[dp_accounting.DpEvent] = []
    if cfg.mode == "central":
        gauss: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(sigma)
        if q < 1:
            gauss = dp_accounting.PoissonSampledDpEvent(q, gauss)
        events += [gauss] * (1 + releases.extra_sums)
    elif cfg.mode == "local":
        events.append(dp_accounting.GaussianDpEvent(sigma / 2))
    if releases.signatures and cfg.signature_noise > 0:
        events.append(dp_accounting.GaussianDpEvent(cfg.signature_noise / 2))
    return dp_accounting.ComposedDpEvent(events)


class PrivacyLedger:
    """The privacy spent round by round, and whether the next round would pass ``target_epsilon``."""

    def __init__(
        self,
        cfg: PrivacyConfig,
        n_clients: int,
        client_fraction: float,
        rounds: int,
        releases: Callable[[int], RoundReleases],
    ):
        self.cfg, self.q, self.releases = cfg, client_fraction, releases
        self.delta = cfg.delta if cfg.delta is not None else default_delta(n_clients)
        self.sigma = (
            cfg.noise_multiplier
            if cfg.noise_multiplier is not None
            else calibrate_sigma(cfg, client_fraction, rounds, releases, self.delta)
        )
        self.accountant = accountant()
        self.rounds = 0
        self.epsilon = 0.0
        self._next: tuple[dp_accounting.rdp.RdpAccountant, float] | None = None  # the next round, accounted

    def _trial(self, round_: int) -> tuple[dp_accounting.rdp.RdpAccountant, float]:
        """The accountant and epsilon after the next round, ``round_`` (computed once)."""
        assert round_ == self.rounds, f"round {round_} is not the next one ({self.rounds})"
        if self._next is None:
            trial = copy.deepcopy(self.accountant)
            trial.compose(round_event(self.cfg, self.sigma, self.q, self.releases(round_)))
            self._next = (trial, float(trial.get_epsilon(self.delta)))
        return self._next

    def spend(self, round_: int) -> float:
        """Account round ``round_`` (rounds are spent in order); returns epsilon so far."""
        self.accountant, self.epsilon = self._trial(round_)
        self._next, self.rounds = None, self.rounds + 1
        return self.epsilon

    def would_exceed(self, round_: int) -> bool:
        """Whether accounting round ``round_`` would take epsilon past ``target_epsilon``."""
        return self.cfg.target_epsilon is not None and self._trial(round_)[1] > self.cfg.target_epsilon * (1 + 1e-9)

    def stop_before(self, round_: int) -> bool:
        """:meth:`would_exceed`, logged: whether a run must stop before ``round_``."""
        if not self.would_exceed(round_):
            return False
        log.info(
            "privacy: stopping before round %d, which would spend more than epsilon %g (spent %.4g)",
            round_,
            self.cfg.target_epsilon,
            self.epsilon,
        )
        return True


def calibrate_sigma(
    cfg: PrivacyConfig, q: float, rounds: int, releases: Callable[[int], RoundReleases], delta: float
) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is ``cfg.target_epsilon``."""
    assert cfg.target_epsilon is not None
    target = cfg.target_epsilon
    kinds = Counter(releases(t) for t in range(rounds))  # rounds that release the same compose at once

    def event(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent(
            [dp_accounting.SelfComposedDpEvent(round_event(cfg, sigma, q, r), n) for r, n in kinds.items()]
        )

    floor = accountant()
    floor.compose(event(1e6))  # what the rest (signatures) spends with next to no noise on the updates
    if floor.get_epsilon(delta) >= target:
        raise ConfigError(
            f"privacy.target_epsilon: {target} is spent by the signatures alone over {rounds} "
            "rounds; raise privacy.signature_noise or the target"
        )
    sigma = dp_accounting.calibrate_dp_mechanism(
        accountant, event, target, delta, dp_accounting.LowerEndpointAndGuess(0.05, 1.0), tol=1e-3
    )
    log.info(
        "privacy: noise multiplier %.4f spends epsilon %.3g at delta %.3g over %d rounds", sigma, target, delta, rounds
    )
    return float(sigma)
