"""Threading chosen before torch starts: passive OpenMP wait on import, thread count from the config."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gfmfr.runtime import use_threads


def _child(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_importing_gfmfr_asks_for_passive_wait_before_torch_loads():
    assert _child("import os, gfmfr, torch; print(os.environ['OMP_WAIT_POLICY'])") == "PASSIVE"


def test_a_users_wait_policy_is_kept():
    assert _child("import os, gfmfr; print(os.environ['OMP_WAIT_POLICY'])", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_use_threads_sets_torch_and_zero_means_one_per_core():
    before = torch.get_num_threads()
    try:
        assert use_threads(1) == 1 and torch.get_num_threads() == 1
        assert use_threads(0) == (os.cpu_count() or 1) == torch.get_num_threads()
        with pytest.raises(ValueError, match="runtime.threads"):
            use_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_threads_flag_reaches_the_config():
    from gfmfr.cli import _config, build_parser

    args = build_parser().parse_args(["run", "--threads", "3"])
    assert _config(args).runtime.threads == 3


def test_use_threads_also_limits_numpy_and_scipy_blas():
    code = (
        "import numpy, scipy.linalg, threadpoolctl; from gfmfr.runtime import use_threads; use_threads(1); "
        "print(sorted({i['num_threads'] for i in threadpoolctl.threadpool_info()}))"
    )
    assert _child(code) == "[1]"


def test_use_threads_also_limits_pools_that_load_later():
    """SciPy's OpenBLAS and scikit-learn's OpenMP load only when GFMFR groups clients, after the run
    chose its threads: they must come up at that count too (they spin on a shared machine)."""
    code = (
        "import threadpoolctl; from gfmfr.runtime import use_threads; use_threads(1); "
        "import scipy.linalg, sklearn.cluster; "
        "print(sorted({i['num_threads'] for i in threadpoolctl.threadpool_info()}))"
    )
    assert _child(code) == "[1]"


@pytest.mark.parametrize("beats, status", [(False, 3), (True, 0)])
def test_the_watchdog_ends_a_process_that_makes_no_progress(beats, status):
    """Without a beat for longer than its limit, one error line and exit status 3; with beats, nothing."""
    code = (
        "import logging, time\n"
        "from gfmfr.runtime import Watchdog\n"
        "logging.basicConfig()\n"
        "with Watchdog(0.5, 'the test') as w:\n"
        "    for _ in range(20):\n"
        f"        time.sleep(0.1)\n        {'w.beat()' if beats else 'pass'}\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == status
    errors = [line for line in proc.stderr.splitlines() if "made no progress" in line]
    assert len(errors) == (0 if beats else 1)
