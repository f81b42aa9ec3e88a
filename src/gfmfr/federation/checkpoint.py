"""Checkpoints of an in-process federation: resume a killed run where it stopped.

After every round the engine writes everything the next round reads into one safetensors file,
atomically (a temporary file, then a rename): the global shared parameters, every client's private
state (sparse rows exactly as held, lazy scales included), the server optimiser's moments, each
plug-in's server state, the per-round log and the best-round selection (as JSON in the file's
metadata). Every random draw is a function of (seed, round), so a run resumed from round t computes
what the uninterrupted run computes, bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gfmfr.config import (
    ConfigError,
    RunConfig,
    bearing_dict,
    from_stored,
    same_rounds_under_caps,
)
from gfmfr.eval.selection import BestRound
from gfmfr.federation.history import RoundLog
from gfmfr.federation.plugin import Plugin
from gfmfr.federation.server_steps import ServerOptimizer
from gfmfr.federation.state import FederationState, save_tensors

CHECKPOINT = "checkpoint.safetensors"
WRITE_SHARE = 0.1
"""At most this share of a run's time goes to writing checkpoints (see :func:`due`)."""


class Resumable(Protocol):
    """What a checkpoint holds of a federation (:class:`gfmfr.federation.engine.Federation` is one)."""

    cfg: RunConfig
    state: FederationState
    plugins: tuple[Plugin, ...]
    server_opt: ServerOptimizer
    history: list[RoundLog]


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v.contiguous() for k, v in tensors.items()}


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def server_tensors(
    shared: dict[str, torch.Tensor], plugins: tuple[Plugin, ...]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The server's half of :func:`federation_tensors`: the global shared parameters and each plug-in's
    server state, as named tensors and the plug-ins' JSON state."""
    tensors = _prefixed("shared", shared)
    infos = []
    for k, plugin in enumerate(plugins):
        arrays, meta = plugin.server.state()
        tensors.update(_prefixed(f"plugin{k}", arrays))
        infos.append(meta)
    return tensors, infos


def client_tensors(private: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The clients' half of :func:`federation_tensors`, from :meth:`FederationState.private_tensors`."""
    return _prefixed("clients", private)


def federation_tensors(
    state: FederationState, plugins: tuple[Plugin, ...]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The trained federation as named tensors (the global shared parameters, every client's private
    state, each plug-in's server state) and the plug-ins' JSON state: what a checkpoint and a saved
    model (:mod:`gfmfr.serving.saved`) both keep."""
    tensors, infos = server_tensors(state.shared, plugins)
    return {**tensors, **client_tensors(state.private_tensors())}, infos


def load_federation_tensors(
    state: FederationState, plugins: tuple[Plugin, ...], tensors: dict[str, torch.Tensor], infos: list[dict[str, Any]]
) -> None:
    """Inverse of :func:`federation_tensors` (shapes are the caller's to check)."""
    state.shared.update(_part(tensors, "shared"))
    state.load_private_tensors(_part(tensors, "clients"))
    for k, plugin in enumerate(plugins):
        plugin.server.load_state(_part(tensors, f"plugin{k}"), infos[k])


def due(round_: int, every: int, last: bool, writing: float, elapsed: float) -> bool:
    """Whether a checkpoint is written after ``round_``: after the last round, and every ``every``
    rounds (0: never) unless writing them has already taken more than :data:`WRITE_SHARE` of the
    ``elapsed`` seconds of the run (``writing`` of them). Large private state (FedRAP's dense D_u:
    1.2 GB on Amazon Scientific) is then written less often instead of setting the run's pace."""
    if not every:
        return False
    return last or ((round_ + 1) % every == 0 and writing <= WRITE_SHARE * elapsed)


def save(fed: Resumable, best: BestRound, path: Path) -> None:
    """Everything the rounds after ``fed.history[-1]`` need, in one file written atomically."""
    tensors, plugins = federation_tensors(fed.state, fed.plugins)
    for name, moments in fed.server_opt.state.items():
        tensors.update(_prefixed(f"opt/{name}", moments))
    info = {
        "plugins": plugins,
        "history": [asdict(h) for h in fed.history],
        "best": best.state(),
        "config": bearing(fed.cfg),
    }
    save_tensors(tensors, path, metadata={"gfmfr": json.dumps(info)})


def load(fed: Resumable, best: BestRound, path: Path) -> int:
    """Restore ``fed`` and ``best`` from ``path``; the next round to run."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        info = json.loads(f.metadata()["gfmfr"])
    if not is_of(info["config"], fed.cfg, len(info["history"])):
        raise ConfigError(f"{path}: this checkpoint is of another configuration; give --overwrite to start again")
    load_federation_tensors(fed.state, fed.plugins, tensors, info["plugins"])
    opt = _part(tensors, "opt")
    for key in {k.split("/", 1)[0] for k in opt}:
        fed.server_opt.state[key] = _part(opt, key)
    fed.history = [RoundLog(**h) for h in info["history"]]
    best.load_state(info["best"])
    return len(fed.history)


def bearing(cfg: RunConfig) -> Any:
    """The configuration as the checkpoint records it (what the run computes; not how it runs)."""
    return json.loads(json.dumps(bearing_dict(cfg), default=str))


def is_of(stored: Any, cfg: RunConfig, ran: int) -> bool:
    """Whether a checkpoint after ``ran`` rounds, with this recorded configuration, is of ``cfg``'s
    run: the same configuration read through today's schema (:func:`gfmfr.config.from_stored`; a
    setting ``cfg``'s run never reads does not count), or one that differs only in a round cap that
    bears on no round, ``cfg``'s allowing the rounds done (:func:`gfmfr.config.same_rounds_under_caps`):
    an interrupted run resumes into a longer budget."""
    if not isinstance(stored, dict):
        return False
    try:
        config = from_stored(stored)
    except ConfigError:
        return False
    recorded, wanted = bearing(config), bearing(cfg)
    if recorded == wanted:
        return True
    for values in (recorded, wanted):
        values.get("federation", {}).pop("rounds", None)
    return recorded == wanted and same_rounds_under_caps(config, cfg, ran)


def matches(path: Path, cfg: RunConfig) -> bool:
    """Whether the checkpoint at ``path`` is of ``cfg``."""
    with safe_open(path, "pt") as f:
        info = json.loads(f.metadata()["gfmfr"])
    return is_of(info.get("config"), cfg, len(info.get("history", [])))
