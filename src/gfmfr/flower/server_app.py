"""The ServerApp (``gfmfr.flower.server_app:app``): runs :class:`~gfmfr.flower.strategy.FedRecStrategy`.

The run config names the configuration (``config`` as TOML text, or ``config-file``) and, with
``out``, the folder for ``results.json`` (the in-process engine's schema) and, with
``runtime.save_model``, the trained federation at its best validation round (``out/model/``; the
simulation names ``model-out`` for it alone). The server reads the
data folder for the number of users and items and the items' public content (GFMFR's fusion,
MM-X's and FedVLR's features); it never uses the interactions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from gfmfr.build import build_run_model
from gfmfr.config import RunConfig
from gfmfr.data.dataset import Dataset, load_dataset
from gfmfr.federation.plugin import Plugin
from gfmfr.flower.node import run_config_of
from gfmfr.flower.strategy import FedRecStrategy
from gfmfr.models import FederatedRecommender
from gfmfr.results import federated_results, write_results
from gfmfr.runtime import Watchdog, use_threads
from gfmfr.serving.saved import (
    MODEL_DIR,
    ModelSaver,
    content_fingerprint,
    content_modalities,
)

log = logging.getLogger(__name__)


def main(
    grid: Grid,
    context: Context,
    overrides: dict[str, Any] | None = None,
    dataset: Dataset | None = None,
    result: dict[str, Any] | None = None,
    built: tuple[FederatedRecommender, tuple[Plugin, ...]] | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> None:
    """Train and select as the in-process engine does; write ``out/results.json`` if the run config says where.

    The simulation builds the model (``built``: GFMFR's content PCA included) in its main thread before
    Flower starts its workers, and watches the run itself (``heartbeat``). A deployed ServerApp, a
    process of its own, sets its thread pools here, where it starts, and runs its own
    :class:`~gfmfr.runtime.Watchdog`."""
    settings = {**context.run_config, **(overrides or {})}
    cfg = run_config_of(settings)
    if heartbeat is not None:
        train(grid, settings, cfg, dataset, result, built, heartbeat)
        return
    use_threads(cfg.runtime.threads)
    with Watchdog(cfg.runtime.stall_timeout, "the Flower run") as watchdog:
        train(grid, settings, cfg, dataset, result, built, watchdog.beat)


def train(
    grid: Grid,
    settings: dict[str, Any],
    cfg: RunConfig,
    dataset: Dataset | None,
    result: dict[str, Any] | None,
    built: tuple[FederatedRecommender, tuple[Plugin, ...]] | None,
    heartbeat: Callable[[], None],
) -> None:
    """The body of :func:`main`."""
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    model, plugins = built if built is not None else build_run_model(dataset, cfg)
    out = str(settings["out"]) if settings.get("out") else None
    # the simulation writes results.json itself, and names only the model's folder
    model_out = str(settings["model-out"]) if settings.get("model-out") else out
    save = model_out is not None and cfg.runtime.save_model
    strategy = FedRecStrategy(
        dataset,
        model,
        cfg,
        plugins,
        timeout=float(settings.get("timeout", 3600)),
        node_wait=float(settings.get("node-wait", 600)),
        keep_best=save,
        heartbeat=heartbeat,
    )
    best = strategy.fit(grid)
    if save and model_out is not None and strategy.kept is not None:
        saver = ModelSaver(
            Path(model_out) / MODEL_DIR, dataset, cfg, content_fingerprint(dataset, content_modalities(cfg))
        )
        saver.write(*strategy.best_model(grid))
    body = federated_results(best, strategy.history, plugins)
    body["flower"] = {"partitions": strategy.partitions, "wire_bytes_per_client": strategy.wire_bytes_per_client()}
    results = write_results(cfg, dataset, body, out)
    if result is not None:
        result.update(results)


def make_server_app(
    overrides: dict[str, Any] | None = None,
    dataset: Dataset | None = None,
    result: dict[str, Any] | None = None,
    built: tuple[FederatedRecommender, tuple[Plugin, ...]] | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> ServerApp:
    """A ServerApp; ``overrides`` stand in for run-config entries, ``result`` receives the results
    (``built``, ``heartbeat``: see :func:`main`)."""
    server = ServerApp()
    server.main()(lambda grid, context: main(grid, context, overrides, dataset, result, built, heartbeat))
    return server


app = make_server_app()
