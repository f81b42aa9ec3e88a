"""Federated rounds in one process (docs/method.md, 'One round t'), with validation-based selection.

Each round: sample clients (seeded), train them locally in chunks with the one client-training
routine, FedAvg their shared parameters, let plug-ins do their server work, and validate every
``eval_every`` rounds. The best round is chosen on the validation metric only; the test score
reported is the one at that round (:mod:`gfmfr.eval.selection`). Early stopping counts rounds
since the best validation.
While a chunk of clients trains, a background thread builds the next chunk's examples and
minibatch schedule (``runtime.prefetch``), which depend only on the seed and the round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gfmfr.coldstart import ColdStart
from gfmfr.config import FederationConfig, RunConfig
from gfmfr.data.dataset import Dataset
from gfmfr.data.sampling import train_keys
from gfmfr.eval.evaluator import Evaluator
from gfmfr.eval.selection import BestRound
from gfmfr.federation import checkpoint as ckpt
from gfmfr.federation.aggregation import RoundAggregate
from gfmfr.federation.batched import LocalData, train_clients
from gfmfr.federation.client_step import client_step
from gfmfr.federation.history import RoundLog, spent
from gfmfr.federation.messages import LocalUpdate, TrainInstruction
from gfmfr.federation.plugin import Plugin, wants_signatures
from gfmfr.federation.rounds import close_training, over_before, record_validation, round_line, validates
from gfmfr.federation.server_steps import build_server_optimizer
from gfmfr.federation.state import FederationState
from gfmfr.federation.validation import surviving
from gfmfr.models.base import FederatedRecommender
from gfmfr.privacy.accounting import PrivacyLedger, RoundReleases
from gfmfr.privacy.dp import CentralNoise, privatise

log = logging.getLogger(__name__)


def sample_clients(n_clients: int, fraction: float, seed: int, round_: int, poisson: bool = False) -> np.ndarray:
    """Sorted client indices taking part in ``round_`` (seeded): ``fraction`` of them without
    replacement, or with ``poisson`` each one independently with probability ``fraction`` (under DP,
    where the accounting's amplification by sampling assumes it)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"federation.client_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(n_clients)
    rng = np.random.default_rng([seed, 7, round_])
    if poisson:
        return np.flatnonzero(rng.random(n_clients) < fraction)
    k = max(1, int(round(fraction * n_clients)))
    return np.sort(rng.choice(n_clients, size=k, replace=False))


def participants(n_clients: int, cfg: FederationConfig, seed: int, round_: int, poisson: bool = False) -> np.ndarray:
    """The clients that train in ``round_`` and send: the seeded sample less the seeded dropouts."""
    return surviving(sample_clients(n_clients, cfg.client_fraction, seed, round_, poisson), cfg.dropout, seed, round_)


def privacy_setup(
    cfg: RunConfig, n_clients: int, model: FederatedRecommender, plugins: tuple[Plugin, ...]
) -> tuple[PrivacyLedger | None, CentralNoise | None]:
    """The privacy ledger (None without DP) and the server's central noise (None unless central DP);
    plug-ins are told to noise what they release."""
    p, fed = cfg.privacy, cfg.federation
    if p.mode == "off":
        return None, None

    def releases(t: int) -> RoundReleases:
        extra = sum(pl.server.noised_sums(t) for pl in plugins) if p.mode == "central" else 0
        return RoundReleases(extra, wants_signatures(plugins, t))

    ledger = PrivacyLedger(p, n_clients, fed.client_fraction, fed.rounds, releases)
    log.info("privacy: %s DP, noise multiplier %.4g, clip %g, delta %.3g", p.mode, ledger.sigma, p.clip, ledger.delta)
    if p.mode != "central":
        return ledger, None
    k = model.kinds
    noise = CentralNoise(
        p.clip,
        ledger.sigma * p.clip,
        fed.client_fraction * (1 - fed.dropout) * n_clients,
        k.shared_dense + k.shared_tables,
        cfg.seed,
    )
    for plugin in plugins:
        plugin.server.use_noise(noise)
    return ledger, noise


class Federation:
    """A federation of every user of ``dataset`` training ``model`` for ``cfg.federation.rounds``."""

    def __init__(self, dataset: Dataset, model: FederatedRecommender, cfg: RunConfig, plugins: tuple[Plugin, ...] = ()):
        self.dataset = dataset
        self.model = model
        self.cfg = cfg
        self.plugins = plugins
        self.state = FederationState(model, dataset.n_users, cfg.seed)
        for plugin in plugins:
            self.state.add_scalars(plugin.client.state_init)
        self.evaluator = Evaluator(dataset, cfg.eval, cfg.seed, cfg.runtime.eval_batch)
        self.train_keys = train_keys(dataset)
        self.history: list[RoundLog] = []
        self.server_opt = build_server_optimizer(cfg.federation)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if cfg.runtime.prefetch else None
        self._ahead: tuple[tuple[int, int], Future[LocalData]] | None = None
        self.ledger, self.noise = privacy_setup(cfg, dataset.n_users, model, plugins)
        self.cold: ColdStart | None = None
        if dataset.cold_items is not None:  # cold items are scored from their content
            self.cold = ColdStart(dataset, model, cfg, plugins, self.state)

    def train_round(self, round_: int) -> RoundLog:
        """Local training, aggregation and plug-in server work of one round."""
        fed = self.cfg.federation
        chunks = self.chunks(round_)
        users = np.concatenate(chunks) if chunks else np.empty(0, np.int64)
        seconds = {"train": 0.0, "aggregate": 0.0}
        agg = RoundAggregate(fed, self.plugins, self.state.shared, round_, self.noise, self.ledger is not None)
        terms = tuple(p.client for p in self.plugins)
        want = wants_signatures(self.plugins, round_)
        # chunks bound memory: each chunk's uploads are folded into the aggregate, then dropped
        for k, chunk in enumerate(chunks):
            t0 = time.perf_counter()
            data = self.local_data(round_, k, chunk)
            self.prefetch(*((round_, k + 1) if k + 1 < len(chunks) else (round_ + 1, 0)))
            hints = tuple(p.server.hints(chunk, round_) for p in self.plugins)
            update = train_clients(
                self.model,
                self.state,
                chunk,
                self.dataset,
                fed,
                self.cfg.seed,
                round_,
                terms,
                hints,
                want,
                self.train_keys,
                self.cfg.runtime.client_block,
                data,
            )
            update = self.privatise(update, round_)
            t1 = time.perf_counter()
            agg.add(update)
            del update
            seconds["train"] += t1 - t0
            seconds["aggregate"] += time.perf_counter() - t1
        shared, loss = agg.finish(self.server_opt)
        self.state.shared, entry = close_training(
            self.plugins, self.model, shared, round_, len(users), loss, seconds, agg.rejected
        )
        return entry

    def train_one_by_one(self, users: np.ndarray, round_: int, want_signatures: bool | None = None) -> LocalUpdate:
        """Local training of ``users`` in ``round_`` through the one-client step, one client after
        another, as separate devices would run it (the batched engine must give the same).
        Signatures are uploaded if a plug-in wants them (or as ``want_signatures`` says)."""
        terms = tuple(p.client for p in self.plugins)
        want = wants_signatures(self.plugins, round_) if want_signatures is None else want_signatures
        hints = [p.server.hints(users, round_) for p in self.plugins]
        uploads = []
        for i, u in enumerate(users):
            instruction = TrainInstruction(round_, self.state.shared, tuple(h.of(i) for h in hints), want)
            new, upload = client_step(
                self.model,
                self.cfg.federation,
                self.cfg.seed,
                int(u),
                self.dataset.user_train(int(u)),
                self.state.load(int(u)),
                instruction,
                terms,
                self.dataset.warm_items,
            )
            self.state.save(int(u), new)
            uploads.append(upload)
        return self.privatise(LocalUpdate.stack(uploads), round_)

    def privatise(self, update: LocalUpdate, round_: int) -> LocalUpdate:
        """What the clients send of their uploads under ``cfg.privacy`` (:func:`gfmfr.privacy.dp.privatise`)."""
        sigma = self.ledger.sigma if self.ledger is not None else None
        return privatise(update, self.state.shared, self.cfg.privacy, sigma, self.cfg.seed, round_)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the background thread and any data it is building behind."""
        return {**self.__dict__, "_pool": None, "_ahead": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.cfg.runtime.prefetch:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")

    def chunks(self, round_: int) -> list[np.ndarray]:
        """The clients of ``round_`` (seeded sample), in chunks of ``client_chunk``."""
        fed = self.cfg.federation
        users = participants(self.dataset.n_users, fed, self.cfg.seed, round_, poisson=self.ledger is not None)
        size = self.cfg.runtime.client_chunk
        return [users[start : start + size] for start in range(0, len(users), size)]

    def local_data(self, round_: int, k: int, chunk: np.ndarray) -> LocalData:
        """Examples and minibatch schedule of chunk ``k`` of ``round_``: prefetched if it was, else built now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (round_, k):
            return ahead[1].result()
        return LocalData(self.dataset, chunk, self.cfg.federation, self.cfg.seed, round_, self.train_keys)

    def prefetch(self, round_: int, k: int) -> None:
        """Start building chunk ``k`` of ``round_`` in the background (NumPy releases the GIL in its
        sorts and array arithmetic, so it overlaps with the current chunk's training)."""
        if self._pool is None or round_ >= self.cfg.federation.rounds:
            return
        chunks = self.chunks(round_)
        if k < len(chunks):
            self._ahead = (
                (round_, k),
                self._pool.submit(
                    LocalData, self.dataset, chunks[k], self.cfg.federation, self.cfg.seed, round_, self.train_keys
                ),
            )

    def score(self, users: np.ndarray) -> torch.Tensor:
        """Logits [U, n_items] of ``users`` with the global and their private parameters."""
        return self.state.score(users)

    def evaluate(self, split: str) -> dict[str, float]:
        """The metrics of ``split`` (on the cold-items split: :meth:`gfmfr.coldstart.ColdStart.evaluate`)."""
        if self.cold is not None:
            return self.cold.evaluate(self.evaluator, split)
        return self.evaluator.evaluate(self.score, split)

    def fit(
        self,
        progress: bool = False,
        on_validation: Callable[[int, dict[str, float]], None] | None = None,
        evaluate_test: bool = True,
        log_rounds: bool = True,
        checkpoint: Path | None = None,
        resume: bool = False,
        on_best: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Run every round; returns the selection summary (best round, valid and test metrics).

        ``progress`` shows a bar over rounds with the ETA and the latest validation score (the
        per-round lines are then logged at DEBUG). ``on_validation(round, metrics)`` sees every
        validation (a tuner prunes from it by raising). ``evaluate_test = False`` never reads the
        test split (the summary's ``test`` is then empty). ``log_rounds = False`` logs the per-round
        lines at DEBUG even without a bar (a tuner's trials). With ``checkpoint``, everything the next
        round needs is written there after every ``runtime.checkpoint_every`` rounds, less often where
        writing it would take over a tenth of the run's time
        (:mod:`gfmfr.federation.checkpoint`); with ``resume`` too, a run starts from it if it exists.
        ``on_best(round)`` runs after every round that becomes the best on validation (the run saves
        its model there, :mod:`gfmfr.serving.saved`).
        """

        fed, ev = self.cfg.federation, self.cfg.eval
        best = BestRound(ev.select_metric, fed.early_stop_patience)
        start = 0
        if resume and checkpoint is not None and checkpoint.exists():
            start = ckpt.load(self, best, checkpoint)
            log.info("resuming after round %d from %s", start - 1, checkpoint)
            if self.ledger is not None:  # the privacy the rounds done spent
                for t in range(start):
                    self.ledger.spend(t)
            last = self.history[-1] if self.history else None
            if last is not None and last.valid is not None and best.stop(last.round):
                return best.summary()
        bar = tqdm(
            total=fed.rounds,
            initial=start,
            desc="rounds",
            unit="round",
            disable=not progress,
            leave=True,
            dynamic_ncols=True,
        )
        line = log.debug if progress or not log_rounds else log.info
        every = self.cfg.runtime.checkpoint_every
        began, writing = time.perf_counter(), 0.0
        try:
            for t in range(start, fed.rounds):
                if over_before(self.ledger, t):
                    break
                entry = self.train_round(t)
                if self.ledger is not None:
                    entry.epsilon = self.ledger.spend(t)
                if validates(fed, t):
                    t0 = time.perf_counter()
                    valid = self.evaluate("valid")
                    test = (lambda: self.evaluate("test")) if evaluate_test else dict
                    record_validation(best, entry, valid, time.perf_counter() - t0, test, on_best)
                    line(*round_line(entry))
                    bar.set_postfix_str(
                        f"valid {ev.select_metric} {valid[ev.select_metric]:.4f}, "
                        f"best {best.score:.4f} @ {best.round}{spent(entry)}",
                        refresh=False,
                    )
                else:
                    line(*round_line(entry))
                self.history.append(entry)
                bar.update(1)
                if checkpoint is not None and ckpt.due(
                    t, every, t == fed.rounds - 1, writing, time.perf_counter() - began
                ):
                    t0 = time.perf_counter()
                    ckpt.save(self, best, checkpoint)
                    writing += time.perf_counter() - t0
                if on_validation is not None and entry.valid is not None:
                    on_validation(t, entry.valid)
                if entry.valid is not None and best.stop(t):
                    break
        finally:
            bar.close()
        return best.summary()
