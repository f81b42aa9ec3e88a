"""The local step's unit of work: a batch of scored (client, item) pairs, as the client step, the
batched engine and the plug-ins' loss terms all see it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """One local step of A clients (A = 1 in the one-client step; the batched engine steps many at once)."""

    users: np.ndarray
    """Client id of each of the A clients."""
    items: torch.Tensor
    """[A, B] item id of each example."""
    labels: torch.Tensor
    """[A, B] 1 for a positive, 0 for a sampled negative."""
    mask: torch.Tensor
    """[A, B] 1 for a real example, 0 for padding."""
