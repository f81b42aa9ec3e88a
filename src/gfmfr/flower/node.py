"""A SuperNode's side of the federation: its users, their data and private state, and the two
things the server asks of it (train these users, evaluate all of yours).

A node hosts partition ``p`` of ``P``: the users ``np.array_split(range(n_users), P)[p]``. It
holds those users' interactions only (:meth:`gfmfr.data.dataset.Dataset.only_users`), never
another node's. Their private state lives in an in-process store and, when the node has a
state directory, in one safetensors file there, rewritten atomically after every round it
trains: a restarted node reads it back and its users carry on where they were.

Which process serves a node can change between messages (Flower's simulation hands a node's
messages to any of its workers; a deployed SuperNode starts a process per message, and can
restart), so every reply bumps a generation counter kept in the node's Flower context; a process
whose copy is of another generation reloads the state file first.

Training is idempotent: the state file also keeps the last round trained and the uploads it
produced, written in the same atomic step, so a train message the server sends again (its reply
was lost with a node that died) gets the same reply instead of training the users twice.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from gfmfr.build import build_client_model, build_client_terms
from gfmfr.config import RunConfig, from_dict, load_toml
from gfmfr.data.dataset import Dataset, load_dataset
from gfmfr.data.sampling import train_keys
from gfmfr.eval.evaluator import Evaluator
from gfmfr.federation.batched import train_clients
from gfmfr.federation.messages import Hints, LocalUpdate
from gfmfr.federation.plugin import LossTerm
from gfmfr.federation.state import FederationState, save_tensors
from gfmfr.flower.wire import update_arrays, update_from_arrays
from gfmfr.models.base import FederatedRecommender, Params
from gfmfr.privacy.dp import privatise

log = logging.getLogger(__name__)

STATE_FILE = "clients.safetensors"
BEST_FILE = "best.safetensors"
"""The users' private state at the run's best validation round so far (:meth:`Node.snapshot`)."""


def partition_users(n_users: int, partition: int, partitions: int) -> np.ndarray:
    """The users node ``partition`` of ``partitions`` hosts: a contiguous block."""
    if not 0 <= partition < partitions:
        raise ValueError(f"partition-id must be in [0, {partitions}), got {partition}")
    return np.array_split(np.arange(n_users), partitions)[partition]


def run_config_of(values: dict) -> RunConfig:
    """The RunConfig an app's run config carries: ``config`` (TOML text) or ``config-file`` (a path)."""
    if values.get("config"):
        return from_dict(tomllib.loads(str(values["config"])), where="run config 'config'")
    if values.get("config-file"):
        return from_dict(load_toml(str(values["config-file"])), where=str(values["config-file"]))
    return from_dict({})


_DATA: dict[str, Dataset] = {}


def _dataset(cfg: RunConfig) -> Dataset:
    """The data ``cfg.data`` names, read once per process (a process may serve many nodes)."""
    key = repr(cfg.data)
    if key not in _DATA:
        _DATA[key] = load_dataset(cfg.data)
    return _DATA[key]


@dataclass
class Node:
    """One node's users, data, model and private state."""

    cfg: RunConfig
    users: np.ndarray
    """The users this node hosts (global ids)."""
    dataset: Dataset
    """Their interactions only."""
    model: FederatedRecommender
    terms: tuple[LossTerm, ...]
    state: FederationState
    evaluator: Evaluator
    train_keys: np.ndarray
    state_file: Path | None
    generation: int = -1
    """Generation of the state this process holds (-1: none read yet)."""
    last: tuple[int, LocalUpdate] | None = None
    """The last round this node trained and the uploads it sent for it."""
    best: dict[str, torch.Tensor] | None = None
    """The last snapshot, for a node without a state directory (:meth:`snapshot`)."""

    @staticmethod
    def build(cfg: RunConfig, partition: int, partitions: int, state_dir: str | None) -> Node:

        full = _dataset(cfg)
        users = partition_users(full.n_users, partition, partitions)
        dataset = full.only_users(users)
        model = build_client_model(dataset, cfg)
        terms = build_client_terms(cfg)
        state = FederationState(model, dataset.n_users, cfg.seed, clients=users)
        for term in terms:
            state.add_scalars(term.state_init)
        state_file = None
        if state_dir:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            state_file = Path(state_dir) / STATE_FILE
        log.info(
            "node %d/%d: %d users, %d training pairs",
            partition,
            partitions,
            len(users),
            int(dataset.train_counts.sum()),
        )
        item_counts = np.bincount(full.train_items, minlength=full.n_items)  # the protocol's long-tail slice
        evaluator = Evaluator(dataset, cfg.eval, cfg.seed, cfg.runtime.eval_batch, item_counts)
        return Node(cfg, users, dataset, model, terms, state, evaluator, train_keys(dataset), state_file)

    def sync(self, generation: int) -> None:
        """Make sure this process holds generation ``generation`` of the users' state."""
        if generation == self.generation:
            return
        if self.state_file is not None and self.state_file.exists():
            tensors = load_file(self.state_file)
            self.state.load_private_tensors({k: v for k, v in tensors.items() if not k.startswith(("reply/", "meta/"))})
            reply = {k[len("reply/") :]: v for k, v in tensors.items() if k.startswith("reply/")}
            self.last = (int(tensors["meta/round"]), update_from_arrays(reply)) if reply else None
            log.info("node state read back from %s", self.state_file)
        elif generation > 0:
            raise RuntimeError(
                f"this node's state is at generation {generation}, but it has no state file "
                "to read it from (give the node a state-dir)"
            )
        self.generation = generation

    def set_shared(self, shared: Params) -> None:
        """Take the server's shared parameters (a node computes the public content tables itself)."""
        self.state.shared.update(shared)

    def train(
        self,
        round_: int,
        users: np.ndarray,
        hints: tuple[Hints, ...],
        want_signatures: bool,
        noise_multiplier: float = 0.0,
    ) -> LocalUpdate:
        """Train ``users`` (this node's sampled users) for one round, in chunks, with the batched step;
        their uploads as they leave the clients under ``cfg.privacy`` (:func:`gfmfr.privacy.dp.privatise`)."""
        if not np.isin(users, self.users).all():
            raise ValueError("the server sent this node users it does not host")
        if self.last is not None and self.last[0] == round_:  # sent again: the reply was lost, not the work
            return self.last[1]
        size = self.cfg.runtime.client_chunk
        parts: list[LocalUpdate] = []
        for start in range(0, len(users), size):
            at = np.arange(start, min(start + size, len(users)))
            parts.append(
                train_clients(
                    self.model,
                    self.state,
                    users[at],
                    self.dataset,
                    self.cfg.federation,
                    self.cfg.seed,
                    round_,
                    self.terms,
                    tuple(h.take(at) for h in hints),
                    want_signatures,
                    self.train_keys,
                    self.cfg.runtime.client_block,
                )
            )
        update = parts[0] if len(parts) == 1 else LocalUpdate.concat(parts)
        update = privatise(update, self.state.shared, self.cfg.privacy, noise_multiplier or None, self.cfg.seed, round_)
        self.last = (round_, update)
        return update

    def persist(self) -> int:
        """Write the users' state and the last round's uploads to the state file, in one atomic
        step; the new generation."""
        self.generation += 1
        if self.state_file is not None:
            tensors = self.state.private_tensors()
            if self.last is not None:
                tensors["meta/round"] = torch.tensor(self.last[0])
                tensors.update({f"reply/{k}": torch.as_tensor(v) for k, v in update_arrays(self.last[1]).items()})
            save_tensors({k: v.contiguous() for k, v in tensors.items()}, self.state_file)
        return self.generation

    def snapshot(self, round_: int) -> None:
        """Keep the users' private state as it stands after ``round_``, the run's best validation round
        so far, for the saved model: in the state directory, where any process serving the node finds
        it (in this process's memory when the node has none)."""
        tensors = {**self.state.private_tensors(), "meta/round": torch.tensor(round_)}
        if self.state_file is not None:
            save_tensors({k: v.contiguous() for k, v in tensors.items()}, self.state_file.with_name(BEST_FILE))
        else:
            self.best = {k: v.clone() for k, v in tensors.items()}

    def exported(self) -> dict[str, torch.Tensor]:
        """The last snapshot (``meta/round`` and :meth:`FederationState.private_tensors`' keys)."""
        if self.state_file is not None and self.state_file.with_name(BEST_FILE).exists():
            return load_file(self.state_file.with_name(BEST_FILE))
        if self.best is None:
            raise RuntimeError(
                "this node kept no snapshot of its users' state (no best round yet, or no "
                "state-dir to keep it in across processes)"
            )
        return self.best

    def evaluate(self, split: str) -> dict[str, float]:
        """Metric sums of this node's users on ``split``."""
        with torch.no_grad():
            return self.evaluator.sums(self.state.score, split, self.users)
