"""The named steps of a round that both round loops take: the in-process engine's
(:meth:`gfmfr.federation.engine.Federation.fit`) and Flower's, through the strategy's hooks
(:class:`gfmfr.flower.strategy.FedRecStrategy`). What differs between the two is only how clients are
reached; what a round is, when it validates and how the best round is chosen are here, once.

1. :func:`over_before`: the privacy budget allows no more rounds.
2. (train and aggregate: the engine's batched step, or the nodes over messages)
3. :func:`close_training`: the plug-ins' server work, the content prior's move, the round's log.
4. :func:`validates`: whether the round ends with a validation.
5. :func:`record_validation`: the round's validation, the best round so far (test metrics only at a
   new best), and the round's log line.
6. the best round's early stopping (:meth:`gfmfr.eval.selection.BestRound.stop`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gfmfr.config import FederationConfig
from gfmfr.eval.selection import BestRound
from gfmfr.federation.history import RoundLog, spent
from gfmfr.federation.messages import Params
from gfmfr.federation.plugin import Plugin, end_round, move_shared
from gfmfr.models.base import FederatedRecommender
from gfmfr.privacy.accounting import PrivacyLedger


def over_before(ledger: PrivacyLedger | None, round_: int) -> bool:
    """Whether the run must stop before ``round_``: under DP, the budget would be exceeded."""
    return ledger is not None and ledger.stop_before(round_)


def close_training(
    plugins: tuple[Plugin, ...],
    model: FederatedRecommender,
    shared: Params,
    round_: int,
    clients: int,
    loss: float,
    seconds: dict[str, float],
    rejected: int,
) -> tuple[Params, RoundLog]:
    """After aggregation: every plug-in's server work (its phases added to ``seconds``), the global
    parameters the next round starts from (GFMFR's content prior), and the round's log."""
    up, down, extra = end_round(plugins, model, round_, seconds)
    shared = move_shared(plugins, shared, round_)
    return shared, RoundLog(round_, clients, loss, seconds, up, down, rejected=rejected, extra=extra)


def validates(cfg: FederationConfig, round_: int) -> bool:
    """Whether ``round_`` ends with a validation: every ``federation.eval_every`` rounds, and the last."""
    return (round_ + 1) % cfg.eval_every == 0 or round_ == cfg.rounds - 1


def record_validation(
    best: BestRound,
    entry: RoundLog,
    valid: dict[str, float],
    seconds: float,
    test: Callable[[], dict[str, float]],
    on_best: Callable[[int], None] | None = None,
) -> bool:
    """Record the round's validation in ``entry`` and in ``best`` (``test()`` is asked for only at a new
    best round, which ``on_best`` then sees); whether the round is the best so far."""
    entry.valid = valid
    entry.seconds["evaluate"] = seconds
    improved = best.update(entry.round, valid, test)
    if improved and on_best is not None:
        on_best(entry.round)
    return improved


def round_line(entry: RoundLog) -> tuple[Any, ...]:
    """The round's log line, as ``logging`` arguments."""
    if entry.valid is None:
        return ("round %3d  loss %.4f  (%.2fs train)%s", entry.round, entry.loss, entry.seconds["train"], spent(entry))
    return (
        "round %3d  loss %.4f  valid HR@10 %.4f NDCG@10 %.4f  (%.2fs train)%s",
        entry.round,
        entry.loss,
        entry.valid.get("HR@10", float("nan")),
        entry.valid.get("NDCG@10", float("nan")),
        entry.seconds["train"],
        spent(entry),
    )
