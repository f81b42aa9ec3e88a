"""Run configuration: frozen dataclasses, loadable from TOML, overridable from the CLI.

:mod:`.schema` holds the sections and their fields, :mod:`.loading` reads TOML and ``--set``
overrides into them and checks every value, :mod:`.rules` says when two configurations are the same
run (resume, ``compare``).

Every field has a documented default. A TOML file mirrors the sections::

    seed = 0
    [data]
    dataset = "ml-100k"
    [model]
    name = "fedrap"
    [federation]
    rounds = 100

and ``--set section.field=value`` overrides one field from the command line.
"""

from gfmfr.config.loading import (
    RANGES,
    RETIRED,
    apply_overrides,
    check_cold_split,
    check_privacy,
    from_dict,
    load_toml,
    to_dict,
    to_toml,
)
from gfmfr.config.rules import bearing_dict, cap_bears, from_stored, same_rounds_under_caps
from gfmfr.config.schema import (
    SCORE_BASELINES,
    CentralisedConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    FederationConfig,
    GFMFRConfig,
    ModelConfig,
    MultimodalConfig,
    PrivacyConfig,
    RunConfig,
    RuntimeConfig,
)

__all__ = [
    "RANGES",
    "RETIRED",
    "SCORE_BASELINES",
    "CentralisedConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FederationConfig",
    "GFMFRConfig",
    "ModelConfig",
    "MultimodalConfig",
    "PrivacyConfig",
    "RunConfig",
    "RuntimeConfig",
    "apply_overrides",
    "bearing_dict",
    "cap_bears",
    "check_cold_split",
    "check_privacy",
    "from_dict",
    "from_stored",
    "load_toml",
    "same_rounds_under_caps",
    "to_dict",
    "to_toml",
]
