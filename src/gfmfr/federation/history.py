"""The per-round log of a federation, the same on both backends (``results.json``'s ``history``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundLog:
    """One round of the per-round log."""

    round: int
    clients: int
    loss: float
    seconds: dict[str, float]
    bytes_up_per_client: int
    bytes_down_per_client: int
    valid: dict[str, float] | None = None
    rejected: int = 0
    """Uploads the server rejected (non-finite, or an update norm far above the round's median)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Plug-ins' figures (:attr:`gfmfr.federation.messages.PluginReport.figures`)."""
    epsilon: float | None = None
    """Under DP, the privacy spent so far, epsilon at the run's delta (:mod:`gfmfr.privacy.accounting`)."""


def spent(entry: RoundLog) -> str:
    """The privacy spent so far, for a round's log line (empty without DP)."""
    return "" if entry.epsilon is None else f", epsilon {entry.epsilon:.3g}"
