"""Loading a configuration: TOML and ``--set`` overrides into the schema's dataclasses, each value
coerced to its field's type and checked against its range; retired keys are errors that say what to
write instead."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import tomli_w

from gfmfr.config.schema import ConfigError, RunConfig


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a TOML or CLI value to the annotated field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        kind = type(args[0])
        value = _coerce(value, kind, where)
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {value!r} as {tp.__name__}") from exc
    return value


def _build(cls: Any, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a table")
            kwargs[name] = _build(tp, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}.{name}")
    return cls(**kwargs)


RETIRED = {
    ("federation", "client_chunk"): "write runtime.client_chunk",
    ("federation", "client_block"): "write runtime.client_block",
    ("federation", "prefetch"): "write runtime.prefetch",
    ("federation", "loss_average"): "delete it: a batch's loss is the mean over the pairs it holds",
    ("eval", "user_batch"): "write runtime.eval_batch",
    ("gfmfr", "server_epochs"): "write gfmfr.server_steps",
    ("gfmfr", "distill"): 'delete it: GFMFR always distils (plugin = "none" runs the base model alone)',
    ("model", "fedrap_head"): "delete it: FedRAP scores u . (C_i + D_i), its paper's head",
    ("data", "max_train_per_user"): "delete it: give the data folder the interactions to train on",
}
"""Keys this project no longer reads, with what to write instead: a config that has one is an error
that says so (:func:`from_dict`)."""

RETIRED_AS_TODAY = {
    ("model", "fedrap_head"): "dot",
    ("data", "max_train_per_user"): 0,
}
"""Retired keys whose value, when a stored run has it, means what today's code computes: a finished run
or a checkpoint that recorded it is still a run of today's configuration (:func:`gfmfr.config.from_stored`)."""


def _retired(values: dict[str, Any], where: str) -> None:
    if values.get("plugin") in ("mmx", "fedvlr"):
        raise ConfigError(
            f'{where}.plugin: {values["plugin"]!r} is a model wrapper: write wrapper = "{values["plugin"]}"'
        )
    for (section, key), instead in RETIRED.items():
        if isinstance(values.get(section), dict) and key in values[section]:
            raise ConfigError(f"{where}.{section}.{key}: no longer a setting; {instead}")


RANGES: dict[tuple[str, str], tuple[Any, str]] = {
    ("federation", "rounds"): (lambda v: v >= 1, "at least 1"),
    ("federation", "client_fraction"): (lambda v: 0 < v <= 1, "in (0, 1]"),
    ("federation", "local_epochs"): (lambda v: v >= 1, "at least 1"),
    ("federation", "batch_size"): (lambda v: v >= 1, "at least 1"),
    ("federation", "num_negatives"): (lambda v: v >= 0, "at least 0"),
    ("federation", "eval_every"): (lambda v: v >= 1, "at least 1"),
    ("federation", "early_stop_patience"): (lambda v: v >= 0, "at least 0"),
    ("federation", "dropout"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("federation", "reject_norm"): (lambda v: v is None or v >= 0, "at least 0, or none"),
    ("privacy", "clip"): (lambda v: v > 0, "above 0"),
    ("privacy", "noise_multiplier"): (lambda v: v is None or v > 0, "above 0, or none"),
    ("privacy", "target_epsilon"): (lambda v: v is None or v > 0, "above 0, or none"),
    ("privacy", "delta"): (lambda v: v is None or 0 < v < 1, "in (0, 1), or none"),
    ("privacy", "signature_clip"): (lambda v: v > 0, "above 0"),
    ("privacy", "signature_noise"): (lambda v: v >= 0, "at least 0"),
    ("privacy", "secagg_neighbours"): (lambda v: v >= 3, "at least 3"),
    ("privacy", "secagg_threshold"): (lambda v: 0 < v <= 1, "in (0, 1]"),
    ("model", "dim"): (lambda v: v >= 1, "at least 1"),
    ("model", "lr"): (lambda v: v is None or v > 0, "above 0, or none (the model's default)"),
    ("model", "item_lr"): (lambda v: v is None or v > 0, "above 0, or none (the model's default)"),
    ("model", "private_item_lr"): (lambda v: v is None or v >= 0, "at least 0, or none (the model's default)"),
    ("model", "weight_decay"): (lambda v: v >= 0, "at least 0"),
    ("model", "init_std"): (lambda v: v > 0, "above 0"),
    ("model", "fedrap_lambda"): (lambda v: v >= 0, "at least 0"),
    ("model", "fedrap_mu"): (lambda v: v >= 0, "at least 0"),
    ("federation", "server_lr"): (lambda v: v > 0, "above 0"),
    ("federation", "server_momentum"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("federation", "server_beta2"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("federation", "server_tau"): (lambda v: v > 0, "above 0"),
    ("gfmfr", "server_lr"): (lambda v: v > 0, "above 0"),
    ("gfmfr", "ema_decay"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("gfmfr", "max_ratio"): (lambda v: v > 0, "above 0"),
    ("gfmfr", "content_prior"): (lambda v: v >= 0, "at least 0"),
    ("gfmfr", "pca_variance"): (lambda v: v is None or 0 < v <= 1, "in (0, 1], or none"),
    ("gfmfr", "content_dim"): (lambda v: v is None or v >= 1, "at least 1, or none"),
    ("multimodal", "content_lr"): (lambda v: v > 0, "above 0"),
    ("multimodal", "router_lr"): (lambda v: v >= 0, "at least 0"),
    ("multimodal", "content_dim"): (lambda v: v is None or v >= 1, "at least 1, or none"),
    ("centralised", "epochs"): (lambda v: v >= 1, "at least 1"),
    ("centralised", "patience"): (lambda v: v >= 0, "at least 0"),
    ("centralised", "batch_size"): (lambda v: v >= 1, "at least 1"),
    ("centralised", "lr"): (lambda v: v > 0, "above 0"),
    ("gfmfr", "groups"): (lambda v: v >= 1, "at least 1"),
    ("gfmfr", "server_steps"): (lambda v: v >= 1, "at least 1"),
    ("gfmfr", "server_every"): (lambda v: v >= 1, "at least 1"),
    ("gfmfr", "score_members"): (lambda v: v >= 1, "at least 1"),
    ("gfmfr", "anneal_rounds"): (lambda v: v is None or v >= 1, "at least 1, or none"),
    ("gfmfr", "item_view_dropout"): (lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("runtime", "nodes"): (lambda v: v >= 1, "at least 1"),
    ("runtime", "client_chunk"): (lambda v: v >= 1, "at least 1"),
    ("runtime", "client_block"): (lambda v: v >= 1, "at least 1"),
    ("runtime", "threads"): (lambda v: v >= 0, "at least 0"),
    ("runtime", "checkpoint_every"): (lambda v: v >= 0, "at least 0"),
    ("runtime", "stall_timeout"): (lambda v: v >= 0, "at least 0"),
    ("gfmfr", "landmarks"): (lambda v: v >= 2, "at least 2"),
    ("gfmfr", "exact_grouping_max"): (lambda v: v >= 0, "at least 0"),
}
"""Numeric fields whose value must lie in a range, checked when a config loads."""


def from_dict(values: dict[str, Any], where: str = "config") -> RunConfig:
    """Build a validated :class:`RunConfig` from nested dicts (missing keys take defaults). A retired key
    (:data:`RETIRED`) or a value out of its range (:data:`RANGES`) is a :class:`ConfigError` naming the key."""
    _retired(values, where)
    cfg = _build(RunConfig, values, where)
    for (section, key), (ok, allowed) in RANGES.items():
        value = getattr(getattr(cfg, section), key)
        if not ok(value):
            raise ConfigError(f"{where}.{section}.{key}: must be {allowed}; got {value!r}")
    check_privacy(cfg, where)
    check_cold_split(cfg, where)
    return cfg


def check_cold_split(cfg: RunConfig, where: str = "config") -> None:
    """Settings the ``cold-items`` split cannot go with, as a :class:`ConfigError`."""
    d = cfg.data
    if not 0 < d.cold_item_fraction < 1:
        raise ConfigError(f"{where}.data.cold_item_fraction: must be in (0, 1); got {d.cold_item_fraction!r}")
    if d.split != "cold-items":
        return
    if cfg.eval.protocol != "full":
        raise ConfigError(f"{where}.eval.protocol: the cold-items split ranks against every cold item (full)")
    if cfg.training != "federated" or cfg.runtime.backend != "in-process":
        raise ConfigError(
            f"{where}.data.split: the cold-items split runs federated, in-process "
            "(its item-vector sources live on the in-process server)"
        )
    if cfg.eval.cold_source == "gfmfr" and cfg.plugin != "gfmfr":
        raise ConfigError(f"{where}.eval.cold_source: 'gfmfr' needs plugin = \"gfmfr\"")
    if cfg.eval.cold_source == "mmx" and cfg.wrapper != "mmx":
        raise ConfigError(f"{where}.eval.cold_source: 'mmx' needs wrapper = \"mmx\"")


def check_privacy(cfg: RunConfig, where: str = "config") -> None:
    """Settings that DP (``privacy.mode`` other than ``off``) or secure aggregation cannot go with, as a
    :class:`ConfigError`."""
    p = cfg.privacy
    if p.secure_aggregation and cfg.federation.weighted_aggregation:
        raise ConfigError(
            f"{where}.federation.weighted_aggregation: must be false under secure aggregation "
            "(the nodes' sum is a plain mean over clients)"
        )
    if p.secure_aggregation and cfg.training != "federated":
        raise ConfigError(f"{where}.privacy.secure_aggregation: applies to federated training only")
    if p.mode == "off":
        return
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise ConfigError(f"{where}.privacy: mode {p.mode!r} needs noise_multiplier or target_epsilon")
    if cfg.federation.weighted_aggregation:
        raise ConfigError(
            f"{where}.federation.weighted_aggregation: must be false under DP (a client's weight would reveal its data)"
        )
    if cfg.training != "federated":
        raise ConfigError(f"{where}.privacy.mode: DP applies to federated training only")
    if cfg.plugin == "gfmfr" and p.signature_noise == 0:
        raise ConfigError(
            f"{where}.privacy.signature_noise: must be above 0 under DP with GFMFR, "
            "whose head signatures would otherwise leave the clients in the clear"
        )


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into nested dicts, naming the file on a parse error."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to nested dicts (values are coerced later)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value.strip()
    return out


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able dicts."""
    return dataclasses.asdict(cfg)


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as a TOML document that :func:`load_toml` and ``gfmfr run --config`` read
    back to the same config (TOML has no null: ``None`` is written as the string ``"none"``, which an
    optional field reads back as ``None``)."""

    def ready(values: Any) -> Any:
        if isinstance(values, dict):
            return {k: ready(v) for k, v in values.items()}
        if values is None:
            return "none"
        if isinstance(values, tuple):
            return [ready(v) for v in values]
        return values

    return tomli_w.dumps(ready(to_dict(cfg)))
