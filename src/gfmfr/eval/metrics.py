"""Ranking metrics for one held-out item per user.

Ties are pessimistic: rank = 1 + #(candidates scoring higher than the target)
+ #(other candidates scoring equal to it), so a constant model ranks every target last.
"""

from __future__ import annotations

import torch


def pessimistic_ranks(
    scores: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank of ``target[u]`` among the candidates of row ``u``.

    scores: [U, N]; target: [U] column indices; candidates: optional [U, N] bool (the target
    column must be a candidate). Returns [U] int64 ranks.
    """
    scores = torch.nan_to_num(scores, nan=-torch.inf)  # a NaN score ranks last, never first
    t = scores.gather(1, target[:, None])
    higher = scores > t
    equal = scores == t
    if candidates is not None:
        higher &= candidates
        equal &= candidates
    return 1 + higher.sum(1) + equal.sum(1) - 1


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """HR@K, NDCG@K, Recall@K and MRR@K averaged over users (one relevant item each), and MRR over
    the whole ranking."""
    r = ranks.to(torch.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"HR@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 1.0), 0.0).mean().item()
        out[f"Recall@{k}"] = out[f"HR@{k}"]
        out[f"MRR@{k}"] = torch.where(hit, 1.0 / r, 0.0).mean().item()
    # without a cut-off every user counts, however deep the target sits: what tells methods apart on
    # a slice too small for any of them to place many targets in the top K (the long tail)
    out["MRR"] = (1.0 / r).mean().item()
    return out
