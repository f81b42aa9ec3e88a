"""Process-wide threading, chosen before torch starts so that a run stays fast on a shared machine.

Two settings matter on a small CPU machine that other jobs share:

- OpenMP's wait policy. With the default, torch's worker threads spin after each parallel
  region; when another process holds a core, a spinning worker takes the time slice the thread
  doing the work needed. ``PASSIVE`` makes idle workers sleep. OpenMP reads the policy once, when
  torch loads, so :mod:`gfmfr` sets it on import (``OMP_WAIT_POLICY``, unless the user set it).
- The thread count (``runtime.threads``, default one per core). The same count applies to NumPy's
  and SciPy's BLAS (OpenBLAS keeps its own pool, whose idle threads also spin): GFMFR's grouping
  (distances, eigenvectors) runs there.

``benchmarks/threads.py`` measures both, quiet and with a busy core.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

WAIT_POLICY = "PASSIVE"
"""OpenMP wait policy gfmfr asks for unless ``OMP_WAIT_POLICY`` is already set."""


POOL_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables a thread pool reads when its library loads."""


def prefer_passive_wait() -> None:
    """Ask OpenMP to let idle threads sleep; effective only if torch is not loaded yet."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def use_threads(threads: int) -> int:
    """Set torch's intra-op thread count, and the BLAS and OpenMP pools of NumPy, SciPy and
    scikit-learn: ``threads``, or one per core when 0. Returns the count.

    Loaded pools are resized (threadpoolctl); pools that load later read the count from
    :data:`POOL_VARIABLES`. Before this also covered them, the grouping's SVD ran on SciPy's
    two-thread OpenBLAS: 0.38 s instead of 0.009 s with another job on the cores."""
    import torch  # not at the top: gfmfr sets OpenMP's wait policy (above) before torch loads

    if threads < 0:
        raise ValueError(f"runtime.threads must be >= 0 (0: one per core), got {threads}")
    n = threads if threads > 0 else (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    # pools not loaded yet read their size from the environment when they load: SciPy's own OpenBLAS
    # (scipy.linalg) and scikit-learn's OpenMP arrive only with GFMFR's grouping, after this call
    for var in POOL_VARIABLES:
        os.environ[var] = str(n)
    threadpool_limits(limits=n)  # the pools already loaded (NumPy's BLAS, torch's OpenMP)
    return n


def single_threaded_blas() -> None:
    """Run NumPy's and SciPy's BLAS in the calling thread, in this process and the ones it starts.

    For a process that forks while it computes (Flower's simulation: Ray forks its workers while the
    ServerApp's thread fits GFMFR's PCA). OpenBLAS shuts its worker pool down before a fork; a
    multi-threaded call in flight in another thread then waits for workers that never answer, for
    ever. With one thread OpenBLAS keeps no pool, so there is nothing to wait for.
    """
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    threadpool_limits(limits=1, user_api="blas")


class Watchdog:
    """Ends a run that stops making progress: after ``limit`` seconds without :meth:`beat`, it logs
    one error line and ends the process with exit status 3 (``runtime.stall_timeout``; 0: never).

    A deadlock in a native library holds the thread it strikes and often the whole interpreter's
    signal handling with it; only a thread of its own still runs to end the process.
    """

    EXIT_STATUS = 3

    def __init__(self, limit: float, what: str = "the run"):
        self.limit, self.what = limit, what
        self.last = time.monotonic()
        self.stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Progress was made now."""
        self.last = time.monotonic()

    def __enter__(self) -> Watchdog:
        if self.limit > 0:
            self.beat()
            self._thread = threading.Thread(target=self._watch, name="gfmfr-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(min(self.limit, 5.0)):
            idle = time.monotonic() - self.last
            if idle > self.limit:
                log.error(
                    "%s made no progress for %.0f s (runtime.stall_timeout = %g); ending it",
                    self.what,
                    idle,
                    self.limit,
                )
                logging.shutdown()
                os._exit(self.EXIT_STATUS)
