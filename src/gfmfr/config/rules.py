"""When two configurations are the same run: what a checkpoint may resume into, and what a finished
run in a ``compare`` folder may stand for."""

from __future__ import annotations

from typing import Any

from gfmfr.config.loading import RETIRED_AS_TODAY, from_dict, to_dict
from gfmfr.config.schema import SCORE_BASELINES, PrivacyConfig, RunConfig


def from_stored(values: dict[str, Any]) -> RunConfig:
    """A configuration as a finished run or a checkpoint recorded it, read through today's schema: a field
    added since takes its default; a retired one is dropped where its value means what today's code
    computes (:data:`~gfmfr.config.loading.RETIRED_AS_TODAY`), and is a :class:`ConfigError` otherwise."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for (section, key), today in RETIRED_AS_TODAY.items():
        if isinstance(values.get(section), dict) and values[section].get(key, today) == today:
            values[section].pop(key, None)
    return from_dict(values, "stored config")


def cap_bears(cfg: RunConfig) -> bool:
    """Whether the round cap ``federation.rounds`` changes what the rounds compute, not only how many
    run: differential privacy calibrates its noise over it, and GFMFR without an anneal length of its
    own (``gfmfr.anneal_rounds = None``) anneals over it."""
    return cfg.privacy.mode != "off" or (cfg.plugin == "gfmfr" and cfg.gfmfr.anneal_rounds is None)


def same_rounds_under_caps(stored: RunConfig, cfg: RunConfig, ran: int) -> bool:
    """Whether ``ran`` rounds of ``stored``'s run are the first ``ran`` of ``cfg``'s when the two differ
    only in their round cap: then neither cap bears on a round (:func:`cap_bears`) and ``cfg``'s allows
    them. What a checkpoint may resume into, and what a finished run may stand for (with
    early stopping having ended it before either cap)."""
    return not cap_bears(stored) and not cap_bears(cfg) and 0 < ran <= cfg.federation.rounds


def bearing_dict(cfg: RunConfig) -> dict[str, Any]:
    """:func:`to_dict` less the sections the run never reads: a plug-in's section when that plug-in
    is not on, the centralised section of a federated run. Two runs whose bearing dicts are equal
    compute the same thing (a changed GFMFR default does not make a plain FCF run stale)."""
    values = to_dict(cfg)
    del values["runtime"]
    if cfg.model.name in SCORE_BASELINES:  # they read the data, the evaluation, the seed and their name only
        for section in ("federation", "gfmfr", "centralised", "privacy"):
            values.pop(section, None)
        values["model"] = {"name": cfg.model.name}
        if cfg.model.name == "content-knn":
            values["multimodal"] = {"modalities": values["multimodal"]["modalities"]}
        else:
            del values["multimodal"]
        return values
    if cfg.model.name != "fedrap":  # FedRAP's own settings
        for key in [k for k in values["model"] if k.startswith("fedrap_")]:
            del values["model"][key]
    if cfg.plugin != "gfmfr":
        del values["gfmfr"]
    if cfg.wrapper == "none":
        del values["multimodal"]
    if cfg.training != "centralised":
        del values["centralised"]
    else:  # trains for centralised.epochs, stops by its patience; the round cap is the federation's
        del values["federation"]["rounds"]
        del values["federation"]["early_stop_patience"]
    if cfg.privacy == PrivacyConfig():
        del values["privacy"]
    return values
