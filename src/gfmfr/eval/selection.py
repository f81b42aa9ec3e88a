"""Best-round selection on validation, with early stopping: one loop rule for federated rounds and
centralised epochs alike (docs/method.md, 'One round t')."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class BestRound:
    """Keeps the round with the best validation ``metric`` and its test metrics.

    Test is evaluated only at a round that improves validation (``test`` is called then), so the
    test score reported is always the one at the round selected on validation. ``patience``: stop
    at a validation that many rounds (or epochs) after the best one (0: never).
    """

    def __init__(self, metric: str, patience: int):
        self.metric = metric
        self.patience = patience
        self.round = -1
        self.score = -np.inf
        self.valid: dict[str, float] = {}
        self.test: dict[str, float] = {}

    def update(self, round_: int, valid: dict[str, float], test: Callable[[], dict[str, float]]) -> bool:
        """Record a validation; returns whether it is the new best (then ``test()`` is evaluated)."""
        if valid[self.metric] > self.score:
            self.round, self.score, self.valid, self.test = round_, valid[self.metric], valid, test()
            return True
        return False

    def stop(self, round_: int, unit: str = "round") -> bool:
        """Whether to stop after a validation at ``round_``."""
        stale = round_ - self.round
        if self.patience and stale >= self.patience:
            log.info("early stop after %s %d: no improvement in %d %ss", unit, round_, stale, unit)
            return True
        return False

    def state(self) -> dict[str, Any]:
        """The selection so far, JSON-ready (a checkpoint)."""
        return {
            "round": self.round,
            "score": None if not np.isfinite(self.score) else float(self.score),
            "valid": self.valid,
            "test": self.test,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.round, self.valid, self.test = state["round"], state["valid"], state["test"]
        self.score = -np.inf if state["score"] is None else state["score"]

    def summary(self) -> dict[str, Any]:
        return {"round": self.round, "score": self.score, "valid": self.valid, "test": self.test}
