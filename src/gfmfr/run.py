"""One run end to end: data, model, federation (or baseline), evaluation, ``results.json``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gfmfr.baselines.centralised import train_centralised
from gfmfr.build import build_run_model
from gfmfr.config import ConfigError, RunConfig
from gfmfr.data.dataset import Dataset, load_dataset
from gfmfr.eval.evaluator import Evaluator
from gfmfr.federation.checkpoint import CHECKPOINT
from gfmfr.federation.engine import Federation
from gfmfr.models import BASELINES
from gfmfr.results import federated_results, resolved_settings, write_results
from gfmfr.runtime import use_threads
from gfmfr.serving.saved import (
    MODEL_DIR,
    ModelSaver,
    content_fingerprint,
    content_modalities,
)

log = logging.getLogger(__name__)


def run_baseline(dataset: Dataset, cfg: RunConfig) -> dict[str, Any]:
    """Popularity or random scores through the same evaluation and results schema."""
    t0 = time.perf_counter()
    model = BASELINES[cfg.model.name](dataset, cfg)
    evaluator = Evaluator(dataset, cfg.eval, cfg.seed, cfg.runtime.eval_batch)
    valid = evaluator.evaluate(model.score, "valid")
    test = evaluator.evaluate(model.score, "test")
    seconds = time.perf_counter() - t0
    return {
        "best_round": 0,
        "valid": valid,
        "test": test,
        "history": [{"round": 0, "valid": valid, "seconds": {"evaluate": seconds}}],
        "seconds_per_round": seconds,
    }


def run_federated(
    dataset: Dataset, cfg: RunConfig, progress: bool = False, out: str | Path | None = None, resume: bool = False
) -> dict[str, Any]:
    """Train a federated base model and report the test score at the best validation round."""
    if cfg.runtime.backend == "flower":
        from gfmfr.flower.simulation import run_simulated  # Flower is an optional extra

        return run_simulated(dataset, cfg, out=out)
    if cfg.privacy.secure_aggregation:
        raise ConfigError(
            "privacy.secure_aggregation: secure aggregation sums the uploads of Flower nodes; "
            "run it with --backend flower (and at least 2 nodes)"
        )
    model, plugins = build_run_model(dataset, cfg)
    fed = Federation(dataset, model, cfg, plugins)
    checkpoint = Path(out) / CHECKPOINT if out is not None and cfg.runtime.checkpoint_every else None
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    on_best: Callable[[int], None] | None = None
    if out is not None and cfg.runtime.save_model:
        on_best = ModelSaver(
            Path(out) / MODEL_DIR, dataset, cfg, content_fingerprint(dataset, content_modalities(cfg))
        ).saver_of(fed)

    best = fed.fit(progress=progress, checkpoint=checkpoint, resume=resume, on_best=on_best)
    return federated_results(best, fed.history, plugins)


def run_centralised(dataset: Dataset, cfg: RunConfig) -> dict[str, Any]:
    """The centralised upper bound of ``cfg``'s model (MM-X / FedVLR wrappers allowed, GFMFR not)."""
    if cfg.plugin == "gfmfr":
        raise ValueError("GFMFR is a federated method; training=centralised takes plugin = none (any wrapper)")
    model, _ = build_run_model(dataset, cfg)
    return train_centralised(dataset, model, cfg)


def run(
    cfg: RunConfig,
    out: str | Path | None = None,
    dataset: Dataset | None = None,
    progress: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``cfg``; write ``out/results.json`` if ``out`` is given; return the results dict.
    ``progress`` shows a bar over the federated rounds; ``resume`` continues a killed in-process
    federated run from ``out``'s checkpoint."""
    use_threads(cfg.runtime.threads)
    torch.manual_seed(cfg.seed)
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    log.info("data: %d users, %d items, %d training pairs", dataset.n_users, dataset.n_items, len(dataset.train_items))
    if cfg.model.name == "fedrap" and resolved_settings(cfg)["private_item_lr"] == 0:
        log.warning(
            "FedRAP's private item table D_u does not learn here (model.private_item_lr = 0): this run "
            "trains C alone, which is FCF with FedRAP's regularisers, not FedRAP"
        )
    if cfg.model.name in BASELINES:
        body = run_baseline(dataset, cfg)
    elif cfg.training == "centralised":
        body = run_centralised(dataset, cfg)
    elif cfg.training == "federated":
        body = run_federated(dataset, cfg, progress, out, resume)
    else:
        raise ValueError(f"training must be 'federated' or 'centralised', got {cfg.training!r}")
    results = write_results(cfg, dataset, body, out)
    if out is not None:
        (Path(out) / CHECKPOINT).unlink(missing_ok=True)  # the run is whole: results.json says it all
    return results
