"""Evaluation: vectorised full-ranking and sampled leave-one-out metrics."""

from gfmfr.eval.evaluator import Evaluator
from gfmfr.eval.metrics import metrics_from_ranks, pessimistic_ranks

__all__ = ["Evaluator", "metrics_from_ranks", "pessimistic_ranks"]
