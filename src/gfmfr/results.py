"""The results of a run (``OUT/results.json``): one schema for every backend and every kind of run."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gfmfr.config import RunConfig, to_dict
from gfmfr.data.dataset import Dataset
from gfmfr.federation.history import RoundLog
from gfmfr.federation.plugin import Plugin
from gfmfr.models import BASELINES, build_model


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def federated_results(best: dict[str, Any], history: list[RoundLog], plugins: tuple[Plugin, ...]) -> dict[str, Any]:
    """The body of ``results.json`` of a federated run (either backend): selection, per-round log, plug-ins."""
    train_seconds = [sum(v for k, v in h.seconds.items() if k != "evaluate") for h in history]
    results = {
        "best_round": best["round"],
        "valid": best["valid"],
        "test": best["test"],
        "history": [asdict(h) for h in history],
        "seconds_per_round": float(np.mean(train_seconds)),
    }
    for plugin in plugins:
        results.update(plugin.server.summary())
    return results


def resolved_settings(cfg: RunConfig) -> dict[str, Any]:
    """Settings the config leaves to the code (the model's default learning rates): stored with the
    results, so that a run made before a default changed is recognisably different."""
    if cfg.model.name in BASELINES:
        return {}
    model = build_model(1, cfg.model)
    return {"lr": model.lr, "item_lr": model.item_lr, "private_item_lr": model.private_item_lr}


def write_results(cfg: RunConfig, dataset: Dataset, body: dict[str, Any], out: str | Path | None) -> dict[str, Any]:
    """The whole results dict (config, resolved defaults, data report, ``body``, peak RSS), written
    atomically to ``out/results.json`` if ``out`` is given."""
    results = {
        "config": to_dict(cfg),
        "resolved": resolved_settings(cfg),
        "data": dataset.report,
        **body,
        "peak_rss_mb": peak_rss_mb(),
    }
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
