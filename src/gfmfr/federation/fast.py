"""Performance machinery of the batched engine, apart from the algorithm (each piece is exact:
tests/test_client_training.py holds the engine to the one-client step).

- :func:`keep_freed_memory`: glibc keeps freed blocks instead of unmapping them;
- :func:`scatter_rows`: row-wise accumulation through ``scatter_add`` (twice ``index_add``'s speed);
- :class:`LazyDecay`: weight decay of the item-table rows a round trains, applied as one scalar
  per step instead of a pass over the rows.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch


@functools.cache
def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks instead of unmapping them.

    Local training allocates and frees tensors of tens of MB at every step; unmapped memory
    comes back as fresh zeroed pages, which costs about a third of a round. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD


def scatter_rows(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> None:
    """``table[rows[k]] += alpha * values[k]``, repeats accumulating.

    scatter_add is about twice as fast as index_add on CPU. ``values`` is not modified: autograd
    may hand the same gradient tensor to two leaves (FedRAP's C and D enter as C + D).
    """
    index = rows.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    table.scatter_add_(0, index, values if alpha == 1.0 else values * alpha)


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for every (s, c)."""
    total = int(counts.sum())
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return offsets + np.arange(total)


class LazyDecay:
    """SGD weight decay of the item-table rows a round trains, applied lazily.

    Every row a client holds shrinks by ``k = 1 - lr * wd`` at each of the client's local steps,
    whether or not the step's batch uses it. Rescaling every held row at every step would cost
    more than the step itself, so the table stores ``T / k ** (s - base)`` for the clients still
    training at step s (all of them have taken exactly s steps): a gathered row is multiplied by
    ``k ** (s - base)``, a gradient step divided by ``k ** (s + 1 - base)``. :meth:`settle`
    writes the true rows back, each with the steps its own client took.
    """

    def __init__(self, table: torch.Tensor, k: float, row_steps: np.ndarray):
        self.table, self.k, self.row_steps, self.base = table, k, row_steps, 0

    def factor(self, s: int) -> float:
        return self.k ** (s - self.base)

    def gather(self, rows: torch.Tensor, s: int) -> torch.Tensor:
        """True values of ``rows`` at step ``s`` (a new tensor)."""
        out = self.table.index_select(0, rows)
        f = self.factor(s)
        return out if f == 1.0 else out.mul_(f)

    def step_scale(self, lr: float, s: int) -> float:
        """The factor on a gradient that :meth:`step` adds to the stored rows at step ``s``."""
        return -lr / self.factor(s + 1)

    def step(self, rows: torch.Tensor, grad: torch.Tensor, lr: float, s: int, grad_scale: float = 1.0) -> None:
        """The gradient part of step ``s``: ``T[rows] -= lr * grad`` (repeats accumulate).

        ``grad`` may come pre-multiplied by ``grad_scale``; when that is :meth:`step_scale`,
        the rows are added as they are, with no pass to scale them.
        """
        scale = self.step_scale(lr, s)
        scatter_rows(self.table, rows, grad, 1.0 if scale == grad_scale else scale / grad_scale)

    def settle(self, s: int) -> None:
        """Make the stored rows the true ones as of step ``s``."""
        if self.k == 1.0 or s == self.base:
            return
        exponent = np.clip(np.minimum(self.row_steps, s) - self.base, 0, None)
        factor = torch.from_numpy(self.k ** exponent.astype(np.float64)).float()
        self.table.mul_(factor.view(-1, *([1] * (self.table.dim() - 1))))
        self.base = s

    def settle_if_small(self, s: int) -> None:
        """Settle before the step scale ``1 / k ** (s + 1 - base)`` leaves the comfortable float range."""
        if self.factor(s + 1) < 1e-6:
            self.settle(s)
