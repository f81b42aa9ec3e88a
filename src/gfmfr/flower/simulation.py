"""``gfmfr run --backend flower --nodes N``: the run in Flower's simulation engine, in this process.

The ServerApp runs in a thread of this process, the ClientApps in Ray workers, one CPU each; each
of the N nodes hosts a partition of the users and keeps their state in a directory of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from gfmfr.build import build_run_model
from gfmfr.config import RunConfig, to_toml
from gfmfr.data.dataset import Dataset
from gfmfr.flower.client_app import make_client_app
from gfmfr.flower.server_app import make_server_app
from gfmfr.runtime import Watchdog, single_threaded_blas, use_threads

log = logging.getLogger(__name__)


def run_simulated(
    dataset: Dataset, cfg: RunConfig, state_root: str | None = None, out: str | Path | None = None
) -> dict[str, Any]:
    """Train ``cfg`` on ``cfg.runtime.nodes`` simulated Flower nodes; the body of ``results.json``.
    With ``out`` (and ``runtime.save_model``) the trained federation is saved in ``out/model/``."""
    nodes = cfg.runtime.nodes
    if nodes < 1:
        raise ValueError(f"runtime.nodes must be at least 1, got {nodes}")
    # every node is one worker with one CPU and one thread; so is the server, whose thread computes
    # while Ray forks its workers (no BLAS pool to deadlock: runtime.single_threaded_blas)
    node_cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, threads=1))
    use_threads(1)
    single_threaded_blas()
    built = build_run_model(dataset, node_cfg)  # GFMFR's content PCA: here, before any worker starts
    result: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="gfmfr-flower-") as tmp,
        Watchdog(cfg.runtime.stall_timeout, "the Flower simulation") as watchdog,
    ):
        overrides = {"config": to_toml(node_cfg)}
        if out is not None:
            overrides["model-out"] = str(out)
        server = make_server_app(overrides, dataset, result, built, watchdog.beat)
        client = make_client_app({"config": to_toml(node_cfg), "state-root": state_root or tmp})
        run_simulation(
            server,
            client,
            num_supernodes=nodes,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"log_to_driver": False},
            },
        )
    if not result:
        raise RuntimeError("the Flower simulation ended without results; its log above says why")
    return {k: v for k, v in result.items() if k not in ("config", "resolved", "data", "peak_rss_mb")}
