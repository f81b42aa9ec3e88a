"""An honest-but-curious server's attacks on what clients upload (the privacy audit).

From one client's upload the server tries to tell the client's training positives from every other
item. Each attack scores every item; :func:`attack_figures` reports the AUC (positives against all
other items) and precision@10. The attacks:

- ``rows``: which item rows were sent (sparse uploads send the rows a client trained: its positives
  and its sampled negatives).
- ``change size``: how far each row moved beyond what weight decay alone explains (the server knows
  the broadcast rows; the decay factor is the median ratio over rows).
- ``change direction``: each row's change projected on the client's main direction of change. With a
  dot-product head every trained row moves along the user vector, positives towards it and negatives
  away, so the sign separates them; the side with fewer rows is taken as the positives (a client
  samples several negatives per positive).
- ``signature``: a head signature (GFMFR's grouping input) scores every item with the client's head
  through the model's ``head_score`` hook; for FCF that is the user vector itself.

Dense uploads hide nothing by themselves: the rows a client did not train are the broadcast rows
times one decay factor, so the change attacks read the same signal. Only noise on the client
(local DP) or on the signature hides it; central DP protects the released model, not the uploads.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from gfmfr.models.base import FederatedRecommender


def dense_table(rows: torch.Tensor, row_item: np.ndarray, decay: float, broadcast: torch.Tensor) -> torch.Tensor:
    """A client's whole uploaded table: the broadcast rows times ``decay``, with its sent rows in place."""
    table = broadcast * decay
    table[torch.from_numpy(np.asarray(row_item, np.int64))] = rows
    return table


def change(table: torch.Tensor, broadcast: torch.Tensor) -> torch.Tensor:
    """Each row's change beyond the decay every row shares, [n_items, d]: ``table - lambda * broadcast``
    with lambda the median over rows of the per-row least-squares ratio."""
    flat, g = table.flatten(1).double(), broadcast.flatten(1).double()
    ratio = (flat * g).sum(1) / (g * g).sum(1).clamp_min(1e-30)
    return (flat - ratio.median() * g).float()


def score_rows(row_item: np.ndarray, n_items: int) -> np.ndarray:
    """``rows``: 1 for a sent row, 0 otherwise."""
    s = np.zeros(n_items)
    s[np.asarray(row_item, np.int64)] = 1.0
    return s


def score_size(delta: torch.Tensor) -> np.ndarray:
    """``change size``: the L2 norm of each row's change."""
    return torch.linalg.vector_norm(delta, dim=1).numpy().astype(np.float64)


def score_direction(delta: torch.Tensor, moved: np.ndarray | None = None) -> np.ndarray:
    """``change direction``: each row's change on the top singular direction of the changes, signed
    so that the rows on the positive side are the minority of the ``moved`` rows (default: every row
    with a change above the median size)."""
    size = torch.linalg.vector_norm(delta, dim=1)
    if moved is None:
        moved = (size > size.median()).numpy()
    d = delta.double()
    _, _, vh = torch.linalg.svd(d[torch.from_numpy(moved)] if moved.any() else d, full_matrices=False)
    proj = (d @ vh[0]).numpy()
    if (proj[moved] > 0).sum() > (proj[moved] < 0).sum():
        proj = -proj
    return proj


def score_signature(model: FederatedRecommender, signature: torch.Tensor, items: torch.Tensor) -> np.ndarray:
    """``signature``: the client's head, rebuilt from its signature, scoring every item row of ``items``."""
    with torch.no_grad():
        head = model.head_from_signature(signature[None])
        return model.head_score(head, items[None]).reshape(-1).double().numpy()


def attack_figures(scores: np.ndarray, positives: np.ndarray, k: int = 10, seed: int = 0) -> tuple[float, float]:
    """AUC of ``scores`` for the ``positives`` (item ids) against every other item, and precision@k
    (ties broken at random, seeded)."""
    label = np.zeros(len(scores), bool)
    label[np.asarray(positives, np.int64)] = True
    jitter = np.random.default_rng(seed).random(len(scores)) * 1e-12 * (np.abs(scores).max() + 1)
    top = np.argsort(-(scores + jitter), kind="stable")[:k]
    return float(roc_auc_score(label, scores)), float(label[top].mean())
