"""Where a run stands: its test score against popularity and against the centralised FCF bound.

Both references use the run's data, evaluation and seed. The centralised bound is a run of
its own (tens of seconds on ML-100K), so it is cached under the user cache directory, keyed by
the bearing configuration; popularity is computed each time (it costs one evaluation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any, cast

from gfmfr.config import RunConfig, bearing_dict
from gfmfr.data.dataset import Dataset
from gfmfr.data.ml100k import cache_dir
from gfmfr.run import run

log = logging.getLogger(__name__)


BOUND_MODEL = "fcf"
"""The bound every model is held to: centralised matrix factorisation, the common reference of
the field, trained in about a minute on ML-100K (centralised FedRAP takes ten)."""


def centralised_config(cfg: RunConfig) -> RunConfig:
    """The centralised FCF bound on ``cfg``'s data, evaluation and seed."""
    return dataclasses.replace(
        cfg, training="centralised", plugin="none", model=dataclasses.replace(cfg.model, name=cast(Any, BOUND_MODEL))
    )


def references(dataset: Dataset, cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Test and validation metrics of popularity and of the centralised bound, for ``cfg``'s data and seed."""

    pop = run(
        dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, name="popularity"), training="federated", plugin="none"
        ),
        dataset=dataset,
    )
    bound_cfg = centralised_config(cfg)
    bearing = bearing_dict(bound_cfg)
    # centralised training reads neither the federated learning rates nor the rounds: runs that
    # differ only there share one bound
    bearing["federation"] = {"num_negatives": cfg.federation.num_negatives}
    for name in ("lr", "item_lr", "private_item_lr"):
        bearing["model"].pop(name)
    key = hashlib.sha256(json.dumps(bearing, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / "bounds" / f"{BOUND_MODEL}-{key}.json"
    if path.exists():
        bound = json.loads(path.read_text())
    else:
        log.info("training the centralised %s bound once (about a minute; cached in %s)", BOUND_MODEL, path)
        quiet = logging.getLogger("gfmfr.baselines.centralised")
        level = quiet.level
        quiet.setLevel(
            logging.DEBUG if quiet.getEffectiveLevel() <= logging.DEBUG else logging.WARNING
        )  # lines with -v
        try:
            res = run(bound_cfg, dataset=dataset)
        finally:
            quiet.setLevel(level)
        bound = {"valid": res["valid"], "test": res["test"]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(bound))
    return {"popularity": {"valid": pop["valid"], "test": pop["test"]}, "centralised": bound}


def standing_line(results: dict[str, Any], refs: dict[str, dict[str, Any]], metric: str) -> str:
    """One line: the run's test ``metric`` as a multiple of popularity's and a share of the bound's."""
    ours = results["test"][metric]
    pop = refs["popularity"]["test"][metric]
    bound = refs["centralised"]["test"][metric]
    return (
        f"test {metric} {ours:.4f}: {ours / pop:.2f}x popularity ({pop:.4f}), "
        f"{100 * ours / bound:.0f}% of centralised {BOUND_MODEL.upper()} ({bound:.4f})"
    )
