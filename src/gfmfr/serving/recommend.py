"""Top-K recommendations from a saved federation.

A user's items are scored as its client scores them on its device: the model's forward pass with
its private parameters and the global shared ones (:meth:`FederationState.score`, the evaluation's
scores; GFMFR ranks with the global table too). Items the user interacted with (training,
validation and test) are never returned. Users are scored in blocks, vectorised.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from gfmfr.federation.fast import ranges
from gfmfr.serving.saved import SavedModel


@dataclass
class Recommendations:
    """Top-K of a block of users: item indices and scores, [U, K] each (best first)."""

    users: np.ndarray
    items: np.ndarray
    scores: np.ndarray


def top_k(saved: SavedModel, users: np.ndarray, k: int = 10, extra: torch.Tensor | None = None) -> Recommendations:
    """The ``k`` best items of each of ``users`` (contiguous indices) that they have not interacted with.
    ``extra`` [U, N], if given, are the scores of N new items, ranked with the others as items
    ``n_items .. n_items + N - 1`` (:mod:`gfmfr.serving.new_items`)."""
    users = np.asarray(users, np.int64)
    with torch.no_grad():
        scores = saved.state.score(users).float()
    cold = saved.dataset.cold_items if saved.dataset is not None else None
    if cold is not None:  # trained on the cold-items split: no client trained their rows
        scores[:, torch.from_numpy(cold)] = cold_item_scores(saved, users)
    if extra is not None:
        scores = torch.cat([scores, extra.float()], 1)
    k = min(k, scores.shape[1])
    starts, counts = saved.indptr[users], saved.indptr[users + 1] - saved.indptr[users]
    owner = np.repeat(np.arange(len(users)), counts)
    seen = saved.interacted[ranges(starts, counts)]
    scores[torch.from_numpy(owner), torch.from_numpy(seen)] = -torch.inf
    best = torch.topk(scores, k, dim=1)
    items, values = best.indices.numpy(), best.values.numpy()
    return Recommendations(users, items, values)


def cold_item_scores(saved: SavedModel, users: np.ndarray) -> torch.Tensor:
    """Scores [U, n_cold] of a cold-items run's held-out items, from their content as the cold-start
    evaluation scored them (:attr:`SavedModel.cold_source`: GFMFR's fused vectors, MM-X's projection);
    -inf (never recommended) for a model without content."""
    source = saved.cold_source
    if source is None:
        cold = saved.dataset.cold_items if saved.dataset is not None else None
        return torch.full((len(users), 0 if cold is None else len(cold)), -torch.inf)
    return source.scores(saved.state.model, saved.state.client_params(users), users).float()


def blocks(saved: SavedModel, users: np.ndarray, k: int, block: int = 256) -> Iterator[Recommendations]:
    """:func:`top_k` over ``users`` in blocks of ``block`` (bounds the [block, n_items] score memory)."""
    for start in range(0, len(users), block):
        yield top_k(saved, users[start : start + block], k)
