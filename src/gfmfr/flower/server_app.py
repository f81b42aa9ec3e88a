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
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from gfmfr.build import build_run_model
from gfmfr.data.dataset import Dataset, load_dataset
from gfmfr.flower.node import run_config_of
from gfmfr.flower.strategy import FedRecStrategy
from gfmfr.results import federated_results, write_results
from gfmfr.runtime import use_threads
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
) -> None:
    """Train and select as the in-process engine does; write ``out/results.json`` if the run config says where."""

    settings = {**context.run_config, **(overrides or {})}
    cfg = run_config_of(settings)
    use_threads(cfg.runtime.threads)
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    model, plugins = build_run_model(dataset, cfg)
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
    overrides: dict[str, Any] | None = None, dataset: Dataset | None = None, result: dict[str, Any] | None = None
) -> ServerApp:
    """A ServerApp; ``overrides`` stand in for run-config entries, ``result`` receives the results."""
    server = ServerApp()
    server.main()(lambda grid, context: main(grid, context, overrides, dataset, result))
    return server


app = make_server_app()
