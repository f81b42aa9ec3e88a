"""One run end to end: data, model, federation (or baseline), evaluation, ``results.json``."""

from __future__ import annotations

from collections.abc import Callable

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gfmfr.models.wrappers import CONTENT_WRAPPERS, content_tables, wrap
from gfmfr.federation.plugin import LossTerm, Plugin
from gfmfr.config import RunConfig, to_dict
from gfmfr.data.dataset import Dataset, load_dataset
from gfmfr.eval.evaluator import Evaluator
from gfmfr.runtime import use_threads
from gfmfr.models import BASELINES, FederatedRecommender, build_model

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def run_baseline(dataset: Dataset, cfg: RunConfig) -> dict[str, Any]:
    """Popularity or random scores through the same evaluation and results schema."""
    t0 = time.perf_counter()
    model = BASELINES[cfg.model.name](dataset, cfg)
    evaluator = Evaluator(dataset, cfg.eval, cfg.seed, cfg.runtime.eval_batch)
    valid = evaluator.evaluate(model.score, "valid")
    test = evaluator.evaluate(model.score, "test")
    seconds = time.perf_counter() - t0
    return {
        "best_round": 0, "valid": valid, "test": test,
        "history": [{"round": 0, "valid": valid, "seconds": {"evaluate": seconds}}],
        "seconds_per_round": seconds,
    }


def content_model(dataset: Dataset, model: FederatedRecommender, cfg: RunConfig) -> FederatedRecommender:
    """``model`` wrapped as MM-X or FedVLR (``cfg.wrapper``), with the dataset's content features."""
    from gfmfr.data.encoders import dataset_features

    mm = cfg.multimodal
    features = dataset_features(dataset, mm.modalities)
    content = content_tables(features.features, features.mask, mm.modalities, mm.content_dim, cfg.seed)
    return wrap(model, cfg.wrapper, content, mm)


def build_client_model(dataset: Dataset, cfg: RunConfig) -> FederatedRecommender:
    """The base model of ``cfg``, wrapped for MM-X / FedVLR (content features from ``dataset``)."""
    model = build_model(dataset.n_items, cfg.model)
    return content_model(dataset, model, cfg) if cfg.wrapper in CONTENT_WRAPPERS else model


def build_client_terms(cfg: RunConfig) -> tuple[LossTerm, ...]:
    """The client halves of ``cfg``'s plug-ins alone (what a node needs, without any server work)."""
    if cfg.plugin == "gfmfr":
        from gfmfr.plugins import group_fusion

        return (group_fusion.client_half(cfg),)
    return ()


def build_run_model(dataset: Dataset, cfg: RunConfig) -> tuple[FederatedRecommender, tuple[Plugin, ...]]:
    """The base model of ``cfg`` (wrapped for MM-X / FedVLR) and the plug-ins on the federation (GFMFR)."""
    model = build_client_model(dataset, cfg)
    if cfg.plugin == "gfmfr":
        from gfmfr.plugins import group_fusion

        return model, (group_fusion.build(dataset, model, cfg),)
    return model, ()


def run_federated(dataset: Dataset, cfg: RunConfig, progress: bool = False, out: str | Path | None = None,
                  resume: bool = False) -> dict[str, Any]:
    """Train a federated base model and report the test score at the best validation round."""
    from gfmfr.federation.engine import Federation

    if cfg.runtime.backend == "flower":
        from gfmfr.flower.simulation import run_simulated

        return run_simulated(dataset, cfg, out=out)

    from gfmfr.federation.checkpoint import CHECKPOINT

    model, plugins = build_run_model(dataset, cfg)
    fed = Federation(dataset, model, cfg, plugins)
    checkpoint = Path(out) / CHECKPOINT if out is not None and cfg.runtime.checkpoint_every else None
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    on_best: Callable[[int], None] | None = None
    if out is not None and cfg.runtime.save_model:
        from gfmfr.serving.saved import MODEL_DIR, ModelSaver, content_fingerprint, content_modalities

        on_best = ModelSaver(Path(out) / MODEL_DIR, dataset, cfg,
                             content_fingerprint(dataset, content_modalities(cfg))).saver_of(fed)

    best = fed.fit(progress=progress, checkpoint=checkpoint, resume=resume, on_best=on_best)
    return federated_results(best, fed.history, plugins)


def federated_results(best: dict[str, Any], history: list, plugins: tuple[Plugin, ...]) -> dict[str, Any]:
    """The body of ``results.json`` of a federated run (either backend): selection, per-round log, plug-ins."""
    from dataclasses import asdict

    train_seconds = [sum(v for k, v in h.seconds.items() if k != "evaluate") for h in history]
    results = {
        "best_round": best["round"], "valid": best["valid"], "test": best["test"],
        "history": [asdict(h) for h in history],
        "seconds_per_round": float(np.mean(train_seconds)),
    }
    for plugin in plugins:
        results.update(plugin.server.summary())
    return results


def run_centralised(dataset: Dataset, cfg: RunConfig) -> dict[str, Any]:
    """The centralised upper bound of ``cfg``'s model (MM-X / FedVLR wrappers allowed, GFMFR not)."""
    from gfmfr.baselines.centralised import train_centralised

    if cfg.plugin == "gfmfr":
        raise ValueError("GFMFR is a federated method; training=centralised takes plugin = none (any wrapper)")
    model, _ = build_run_model(dataset, cfg)
    return train_centralised(dataset, model, cfg)


def resolved_settings(cfg: RunConfig) -> dict[str, Any]:
    """Settings the config leaves to the code (the model's default learning rates): stored with the
    results, so that a run made before a default changed is recognisably different."""
    if cfg.model.name in BASELINES:
        return {}
    model = build_model(1, cfg.model)
    return {"lr": model.lr, "item_lr": model.item_lr, "private_item_lr": model.private_item_lr}


def run(cfg: RunConfig, out: str | Path | None = None, dataset: Dataset | None = None,
        progress: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg``; write ``out/results.json`` if ``out`` is given; return the results dict.
    ``progress`` shows a bar over the federated rounds; ``resume`` continues a killed in-process
    federated run from ``out``'s checkpoint."""
    use_threads(cfg.runtime.threads)
    torch.manual_seed(cfg.seed)
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    log.info("data: %d users, %d items, %d training pairs", dataset.n_users, dataset.n_items, len(dataset.train_items))
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
        from gfmfr.federation.checkpoint import CHECKPOINT

        (Path(out) / CHECKPOINT).unlink(missing_ok=True)  # the run is whole: results.json says it all
    return results


def write_results(cfg: RunConfig, dataset: Dataset, body: dict[str, Any], out: str | Path | None) -> dict[str, Any]:
    """The whole results dict (config, resolved defaults, data report, ``body``, peak RSS), written
    atomically to ``out/results.json`` if ``out`` is given."""
    results = {"config": to_dict(cfg), "resolved": resolved_settings(cfg), "data": dataset.report, **body,
               "peak_rss_mb": peak_rss_mb()}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "results.json.part"
        tmp.write_text(json.dumps(results, indent=2, default=_jsonable))
        tmp.replace(out / "results.json")
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (Path,)):
        return str(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")
