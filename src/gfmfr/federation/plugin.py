"""The plug-in contract (the FedProx shape): the server half ships a hint, the client half adds a
loss term. GFMFR (:mod:`gfmfr.plugins.group_fusion`) is one plug-in.

- The **client half** is a :class:`LossTerm`: given a batch, the model's logits and base loss,
  the client's hint and its own per-client scalars, it returns a term to add to the local loss.
  It never forks the training loop; the one-client step and the batched engine call it alike.
- The **server half** (:class:`ServerHalf`) sees only what clients upload and what is public. It
  says whether it wants head signatures this round, gives each sampled client its hint, observes
  the uploads chunk by chunk, and does its own work once the round is aggregated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from gfmfr.federation.batch import Batch
from gfmfr.federation.messages import GroupedUploads, Hints, LocalUpdate, Params, PluginReport
from gfmfr.models.base import FederatedRecommender
from gfmfr.privacy.dp import CentralNoise


@dataclass
class LossContext:
    """One local step of A clients, as a loss term sees it."""

    model: FederatedRecommender
    p: Params
    """Per-client parameters [A, ...] (autograd leaves)."""
    items: Params
    """Item-table rows the batch scores, [A, B, ...]."""
    logits: torch.Tensor
    """[A, B] the model's logits."""
    base_loss: torch.Tensor
    """[A] the base loss of each client's batch (detached)."""
    batch: Batch
    hints: Hints
    """This plug-in's hint of each of the A clients."""
    state: dict[str, torch.Tensor]
    """The term's per-client scalars, [A] each; a term that updates one assigns the new [A] tensor."""
    figures: dict[str, torch.Tensor]
    """Per-client figures to add up over the steps and upload, [A] each (start empty)."""
    round: int
    batch_size: int
    """The configured batch size B (a term averaged over it weighs every pair the same)."""


class LossTerm(Protocol):
    """The client half of a plug-in."""

    state_init: dict[str, float]
    """Per-client scalars the term keeps in the client's state, with their initial values."""
    figures: tuple[str, ...]
    """The per-client figures the term reports (:attr:`LossContext.figures`), summed and uploaded."""

    def loss(self, ctx: LossContext) -> torch.Tensor | None:
        """[A] term per client to add to the local loss, or None (no term this step)."""


class ServerHalf(ABC):
    """The server half of a plug-in."""

    def wants_signatures(self, round_: int) -> bool:
        """Whether clients upload their head signature in ``round_``."""
        return False

    def hints(self, users: np.ndarray, round_: int) -> Hints:
        """The hint each of ``users`` receives with the shared parameters in ``round_`` (none by default)."""
        return Hints.none(len(users))

    def observe(self, update: LocalUpdate, broadcast: Params, round_: int) -> None:
        """See one chunk of per-client uploads (``broadcast``: the shared parameters the clients started
        from); called only in rounds where :meth:`wants_signatures` is true."""

    def observe_figures(self, figures: dict[str, float], round_: int) -> None:
        """The sums over a chunk of clients of the figures its client half reports (every round)."""

    def group(self, users: np.ndarray, signatures: torch.Tensor, round_: int) -> np.ndarray:
        """Under secure aggregation, in a round where :meth:`wants_signatures` is true: the group label
        in ``[0, groups)`` of each of ``users`` from their head ``signatures``; the nodes then sum their
        clients' uploads per group, and :meth:`observe_groups` receives the sums."""
        raise NotImplementedError(f"{type(self).__name__} does not group clients under secure aggregation")

    @property
    def groups(self) -> int:
        """How many groups :meth:`group` labels clients with."""
        return 0

    def observe_groups(self, grouped: GroupedUploads, broadcast: Params) -> None:
        """Under secure aggregation, in place of :meth:`observe`: the participants as :meth:`group`
        labelled them, with their groups' sums taken under SecAgg+, and the broadcast they started from."""
        raise NotImplementedError(f"{type(self).__name__} does not group clients under secure aggregation")

    def use_noise(self, noise: CentralNoise) -> None:
        """Central DP is on: what the server half releases from the clients' uploads must be noised
        with ``noise`` (:mod:`gfmfr.privacy.dp`) and declared by :meth:`noised_sums`."""
        raise NotImplementedError(f"{type(self).__name__} does not support central differential privacy")

    def noised_sums(self, round_: int) -> int:
        """How many Gaussian-noised sums of the clients' clipped updates (or counts) the server half
        releases in ``round_`` under central DP, each accounted like the FedAvg sum."""
        return 0

    @abstractmethod
    def end_round(self, model: FederatedRecommender, round_: int) -> PluginReport:
        """Server work once the round's uploads are aggregated."""

    def move_shared(self, shared: Params, round_: int) -> Params:
        """The global parameters the next round starts from, given those FedAvg made of ``round_``
        (unchanged by default; GFMFR pulls the item table towards its fused content vectors)."""
        return shared

    def summary(self) -> dict[str, Any]:
        """Figures for ``results.json`` once training ends."""
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What the server half carries from round to round, as tensors and JSON (a checkpoint)."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Inverse of :meth:`state`."""


@dataclass
class Plugin:
    """A plug-in: its server half and its client half."""

    server: ServerHalf
    client: LossTerm


def wants_signatures(plugins: tuple[Plugin, ...], round_: int) -> bool:
    """Whether clients upload their head signatures in ``round_`` (a plug-in groups them by it)."""
    return any(p.server.wants_signatures(round_) for p in plugins)


def move_shared(plugins: tuple[Plugin, ...], shared: Params, round_: int) -> Params:
    """The global parameters after every plug-in's :meth:`ServerHalf.move_shared`, in order."""
    for plugin in plugins:
        shared = plugin.server.move_shared(shared, round_)
    return shared


def end_round(
    plugins: tuple[Plugin, ...], model: FederatedRecommender, round_: int, seconds: dict[str, float]
) -> tuple[int, int, dict[str, Any]]:
    """Every plug-in's server work once the round is aggregated: their phases are added to
    ``seconds``; returns the bytes a client sends and receives this round (its shared parameters
    and the plug-ins' extras) and the plug-ins' figures for the round log."""
    up = down = model.upload_bytes()
    figures: dict[str, Any] = {}
    for plugin in plugins:
        report = plugin.server.end_round(model, round_)
        seconds.update(report.seconds)
        up, down = up + report.bytes_up, down + report.bytes_down
        figures.update(report.figures)
    return up, down, figures
