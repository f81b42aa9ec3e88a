"""Ranking metrics for one held-out item per user.

Ties are pessimistic: rank = 1 + #(candidates scoring higher than the target)
+ #(other candidates scoring equal to it), so a constant model ranks every target last.
"""

from __future__ import annotations

import torch


def pessimistic_ranks(
    scores: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank of ``target[u]`` among the candidates of row ``u``: the candidates scored at
    least as high as the target, the target included (ties rank it last). Scores pass through
    ``nan_to_num(nan=-inf)`` first: a NaN ranks last, an infinity as the largest finite value.

    scores: [U, N]; target: [U] column indices; candidates: optional [U, N] (or [1, N]) bool (the
    target column must be a candidate). Returns [U] int64 ranks. One comparison pass over the raw
    scores, which gives the same counts whenever the target's score is finite and below the largest
    finite magnitude; the other rows are ranked on the converted scores.
    """
    t = torch.nan_to_num(scores.gather(1, target[:, None]), nan=-torch.inf)
    at_least = scores >= t  # NaN compares False, -inf below and +inf above any such target
    if candidates is not None:
        at_least &= candidates
    ranks = torch.count_nonzero(at_least, 1)
    extreme = torch.nonzero(~(t[:, 0].abs() < torch.finfo(scores.dtype).max)).flatten()
    if len(extreme):
        low = torch.nan_to_num(scores[extreme], nan=-torch.inf) >= t[extreme]
        if candidates is not None:
            low &= candidates[extreme] if candidates.shape[0] == scores.shape[0] else candidates
        ranks[extreme] = torch.count_nonzero(low, 1)
    return ranks


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
