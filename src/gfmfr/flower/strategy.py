"""The server's strategy on Flower: the in-process round, over messages (docs/method.md, 'One round t').

Flower's :class:`~flwr.serverapp.strategy.Strategy` hooks, each doing what the in-process engine
does (:mod:`gfmfr.federation.engine`):

- :meth:`FedRecStrategy.configure_train`: sample users (not nodes) with the in-process seeded draw,
  and send each node hosting sampled users the shared parameters, those users, and each
  plug-in's hint for them (GFMFR: their groups' preference rows);
- :meth:`FedRecStrategy.aggregate_train`: fold the nodes' partial aggregates into the project's
  FedAvg (or, in a round where a plug-in needs every client's upload, put the uploads in the
  engine's chunk order first), step the server optimiser, run the plug-ins' server half;
- :meth:`FedRecStrategy.configure_evaluate` / :meth:`FedRecStrategy.aggregate_evaluate`: every node
  ranks its own users' held-out items and returns metric sums; the server adds them up.

:meth:`FedRecStrategy.fit` runs the rounds with best-round selection on validation and early
stopping, as :meth:`gfmfr.federation.engine.Federation.fit` does; test metrics are asked for only
at a new best validation round. When the run saves its model, a new best round also has every node
keep its users' private state (``query.snapshot``) and the server its own half; at the end
:meth:`FedRecStrategy.best_model` gathers the nodes' kept state (``query.export``) into the saved
model's layout (:mod:`gfmfr.serving.saved`).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from gfmfr.config import RunConfig
from gfmfr.data.dataset import Dataset
from gfmfr.eval.evaluator import metrics_from_sums
from gfmfr.eval.selection import BestRound
from gfmfr.federation.aggregation import RoundAggregate
from gfmfr.federation.checkpoint import client_tensors, server_tensors
from gfmfr.federation.engine import participants, privacy_setup
from gfmfr.federation.history import RoundLog, spent
from gfmfr.federation.messages import LocalUpdate
from gfmfr.federation.plugin import Plugin, end_round, move_shared, wants_signatures
from gfmfr.federation.server_steps import build_server_optimizer
from gfmfr.federation.state import FederationState
from gfmfr.flower import wire
from gfmfr.flower.node import partition_users
from gfmfr.models.base import FederatedRecommender

log = logging.getLogger(__name__)


def record_bytes(content: RecordDict) -> int:
    """Bytes of the tensors a message carries (what dominates its size on the wire)."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


class FedRecStrategy(Strategy):
    """Federated recommendation with plug-ins, over Flower messages (see the module docstring)."""

    def __init__(
        self,
        dataset: Dataset,
        model: FederatedRecommender,
        cfg: RunConfig,
        plugins: tuple[Plugin, ...] = (),
        timeout: float = 3600.0,
        node_wait: float = 600.0,
        keep_best: bool = False,
        heartbeat: Callable[[], None] = lambda: None,
    ):
        self.cfg, self.model, self.plugins = cfg, model, plugins
        self.heartbeat = heartbeat
        """Called whenever the run makes progress (replies arrive, a round ends): a watchdog's beat."""
        self.keep_best = keep_best
        """Keep the federation of the best validation round (for the saved model)."""
        self.kept: tuple[int, dict[str, Any], list[dict[str, Any]]] | None = None
        """The best round so far and the server's half of it (shared parameters, plug-ins' state)."""
        self.n_users = dataset.n_users
        self.timeout, self.node_wait = timeout, node_wait
        self.shared = FederationState(model, 0, cfg.seed).shared  # the global initialisation
        self.server_opt = build_server_optimizer(cfg.federation)
        self.partition_of: dict[int, int] = {}
        """Node id -> the partition it hosts."""
        self.partitions = 0
        self.history: list[RoundLog] = []
        self.rejected = 0
        """Uploads rejected in the last round aggregated (by the server, or by nodes before they sum)."""
        self.bytes = {"down": 0, "up": 0, "clients": 0}
        self.ledger, self.noise = privacy_setup(cfg, self.n_users, model, plugins)

    # ---- nodes ---------------------------------------------------------------------------------
    def discover(self, grid: Grid) -> None:
        """Wait until a node serves every partition; learn which node serves which."""
        deadline = time.monotonic() + self.node_wait
        while True:
            nodes = set(grid.get_node_ids())
            new = [n for n in nodes if n not in self.partition_of]
            if new:
                messages = [
                    Message(RecordDict({"q": ConfigRecord({})}), dst_node_id=n, message_type="query", group_id="setup")
                    for n in new
                ]
                for reply in grid.send_and_receive(messages, timeout=self.timeout):
                    if reply.has_error():
                        raise RuntimeError(f"node {reply.metadata.src_node_id} failed to answer: {reply.error.reason}")
                    info = reply.content.metric_records["node"]
                    partition = int(wire.scalar(info, "partition-id"))
                    # a restarted node comes back under a new id: the newest serves the partition
                    self.partition_of = {n: p for n, p in self.partition_of.items() if p != partition}
                    self.partition_of[reply.metadata.src_node_id] = partition
                    self.partitions = int(wire.scalar(info, "num-partitions"))
            self.partition_of = {n: p for n, p in self.partition_of.items() if n in nodes}
            if self.partitions and set(self.partition_of.values()) == set(range(self.partitions)):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only partitions {sorted(set(self.partition_of.values()))} of "
                    f"{self.partitions or '?'} have a node after {self.node_wait:.0f} s"
                )
            time.sleep(0.2)

    def node_users(self, partitions: set[int] | None = None) -> dict[int, np.ndarray]:
        """Node id -> the users it hosts, for every partition (or those of ``partitions``)."""
        return {
            node: partition_users(self.n_users, p, self.partitions)
            for node, p in sorted(self.partition_of.items())
            if partitions is None or p in partitions
        }

    def exchange(
        self, grid: Grid, make: Callable[[set[int] | None], list[Message]], attempts: int = 3
    ) -> list[Message]:
        """Send ``make(None)`` and wait for the replies; a partition whose node did not answer in
        time (it died) gets ``make({partition})`` again once a node serves it. Safe for training too:
        a node that already trained the round answers with the uploads it kept (:mod:`.node`)."""
        messages, replies, errors = make(None), {}, []
        for attempt in range(attempts):
            sent = {m.metadata.dst_node_id: self.partition_of[m.metadata.dst_node_id] for m in messages}
            for reply in grid.send_and_receive(messages, timeout=self.timeout):
                self.heartbeat()
                if reply.has_error():  # the ClientApp raised, or the node died with the reply half sent
                    errors.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                elif reply.metadata.src_node_id in sent:
                    replies[sent[reply.metadata.src_node_id]] = reply
            missing = set(sent.values()) - set(replies)
            if not missing:
                break
            log.warning(
                "no reply from partition(s) %s (attempt %d%s); sending again",
                sorted(missing),
                attempt + 1,
                f"; {errors[-1]}" if errors else "",
            )
            self.discover(grid)
            messages = make(missing)
        else:
            raise RuntimeError(
                f"partitions {sorted(missing)} did not reply after {attempts} attempts"
                + (f"; last error: {errors[-1]}" if errors else "")
            )
        return [replies[p] for p in sorted(replies)]

    # ---- Flower's hooks --------------------------------------------------------------------------
    def configure_train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        partitions: set[int] | None = None,
    ) -> Iterable[Message]:
        round_ = server_round - 1
        users = self.sampled(round_)
        want = wants_signatures(self.plugins, round_)
        shared = {n: self.shared[n] for n in self.model.kinds.uploaded}
        messages = []
        for node, hosted in self.node_users(partitions).items():
            mine = users[np.isin(users, hosted)]
            if not len(mine):
                continue
            hints = tuple(p.server.hints(mine, round_) for p in self.plugins)
            sigma = self.ledger.sigma if self.ledger is not None and self.cfg.privacy.mode == "local" else 0.0
            content = wire.encode_train(round_, shared, mine, hints, want, sigma)
            self.bytes["down"] += record_bytes(content)
            self.bytes["clients"] += len(mine)
            messages.append(Message(content, dst_node_id=node, message_type="train", group_id=str(server_round)))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_ = server_round - 1
        agg = RoundAggregate(
            self.cfg.federation, self.plugins, self.shared, round_, self.noise, self.ledger is not None
        )
        updates = []
        for reply in replies:
            self.bytes["up"] += record_bytes(reply.content)
            if "sums" in reply.content:  # a node's partial aggregate
                agg.add_sums(*wire.decode_sums(reply.content, self.shared))
            else:
                updates.append(wire.decode_update(reply.content))
        for chunk in self.chunks(updates) if updates else []:  # the in-process engine's chunks and client order
            agg.add(chunk)
        self.shared, loss = agg.finish(self.server_opt)
        self.rejected = agg.rejected
        return None, MetricRecord({"loss": loss})

    def sampled(self, round_: int) -> np.ndarray:
        """The clients of ``round_`` that do not drop out (as the in-process engine samples them)."""
        return participants(self.n_users, self.cfg.federation, self.cfg.seed, round_, poisson=self.ledger is not None)

    def chunks(self, updates: list[LocalUpdate]) -> list[LocalUpdate]:
        """The uploads regrouped as the in-process engine trains them: sampled users in chunks of
        ``runtime.client_chunk`` by id, each ordered by local steps (most first), then by id. Each
        chunk is gathered from the nodes' uploads in one pass."""
        users = np.concatenate([u.users for u in updates])
        samples = np.concatenate([u.num_samples for u in updates])
        by_id = np.argsort(users)
        fed, size = self.cfg.federation, self.cfg.runtime.client_chunk
        out = []
        for start in range(0, len(by_id), size):
            part = by_id[start : start + size]
            steps = fed.local_epochs * -(-samples[part] // fed.batch_size)
            out.append(LocalUpdate.concat(updates, part[np.lexsort((users[part], -steps))]))
        return out

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        partitions: set[int] | None = None,
    ) -> Iterable[Message]:
        shared = {f"shared/{n}": self.shared[n] for n in self.model.kinds.uploaded}
        return [
            Message(
                RecordDict({"arrays": wire.pack(shared), "config": config}),
                dst_node_id=node,
                message_type="evaluate",
                group_id=f"{server_round}-" + str(config["split"]),
            )
            for node in self.node_users(partitions)
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        parts = []
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to evaluate: {reply.error.reason}")
            parts.append(wire.numbers(reply.content.metric_records["sums"]))
        return wire.metric_record(metrics_from_sums(parts))

    def summary(self) -> None:
        log.info(
            "FedRecStrategy: %s%s, %d rounds, client fraction %s, %d partitions",
            self.cfg.model.name,
            f" + {self.cfg.plugin}" if self.cfg.plugin != "none" else "",
            self.cfg.federation.rounds,
            self.cfg.federation.client_fraction,
            self.partitions,
        )

    # ---- the run -----------------------------------------------------------------------------
    def evaluate(self, grid: Grid, server_round: int, split: str) -> dict[str, float]:
        def messages(parts: set[int] | None) -> list[Message]:
            config = ConfigRecord({"split": split})
            return list(self.configure_evaluate(server_round, ArrayRecord(), config, grid, parts))

        return wire.numbers(self.aggregate_evaluate(server_round, self.exchange(grid, messages)))

    def fit(self, grid: Grid) -> dict[str, Any]:
        """Every round with selection on validation; returns the summary and the per-round log."""
        fed, ev = self.cfg.federation, self.cfg.eval
        self.discover(grid)
        self.summary()
        best = BestRound(ev.select_metric, fed.early_stop_patience)
        for t in range(fed.rounds):
            self.discover(grid)  # a node that restarted comes back under a new id
            if self.ledger is not None and self.ledger.stop_before(t):
                break
            t0 = time.perf_counter()
            sampled = self.sampled(t)

            def messages(parts: set[int] | None, t: int = t) -> list[Message]:
                return list(self.configure_train(t + 1, ArrayRecord(), ConfigRecord(), grid, parts))

            replies = self.exchange(grid, messages)
            t1 = time.perf_counter()
            _, metrics = self.aggregate_train(t + 1, replies)
            seconds = {"train": t1 - t0, "aggregate": time.perf_counter() - t1}
            up, down, extra = end_round(self.plugins, self.model, t, seconds)
            self.shared = move_shared(self.plugins, self.shared, t)
            entry = RoundLog(
                t,
                len(sampled),
                wire.numbers(metrics)["loss"],
                seconds,
                up,
                down,
                rejected=self.rejected,
                extra=extra,
                epsilon=self.ledger.spend(t) if self.ledger is not None else None,
            )
            if (t + 1) % fed.eval_every == 0 or t == fed.rounds - 1:
                t2 = time.perf_counter()
                entry.valid = self.evaluate(grid, t + 1, "valid")
                entry.seconds["evaluate"] = time.perf_counter() - t2
                self.heartbeat()
                test = functools.partial(self.evaluate, grid, t + 1, "test")
                if best.update(t, entry.valid, test) and self.keep_best:
                    self.snapshot(grid, t)
                log.info(
                    "round %3d  loss %.4f  valid NDCG@10 %.4f  (%.2fs train)%s",
                    t,
                    entry.loss,
                    entry.valid.get("NDCG@10", float("nan")),
                    seconds["train"],
                    spent(entry),
                )
            self.history.append(entry)
            if entry.valid is not None and best.stop(t):
                break
        return best.summary()

    def snapshot(self, grid: Grid, round_: int) -> None:
        """``round_`` is the best so far: every node keeps its users' private state, the server its half."""
        self.exchange(
            grid,
            lambda parts: [
                Message(
                    RecordDict({"config": ConfigRecord({"round": round_})}),
                    dst_node_id=node,
                    message_type="query.snapshot",
                    group_id=f"snapshot-{round_}",
                )
                for node in self.node_users(parts)
            ],
        )
        tensors, infos = server_tensors(self.shared, self.plugins)
        self.kept = (round_, {k: v.clone() for k, v in tensors.items()}, copy.deepcopy(infos))

    def best_model(self, grid: Grid) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
        """The federation at the best validation round, in the saved model's layout: (round, tensors,
        plug-ins' JSON state). Each node sends the private state it kept (to the server: this is what
        saving the model in one folder means; a deployment that must keep it on the nodes turns
        ``runtime.save_model`` off)."""
        if self.kept is None:
            raise RuntimeError("no best round was kept (the run saves its model only with keep_best)")
        round_, tensors, infos = self.kept
        replies = self.exchange(
            grid,
            lambda parts: [
                Message(
                    RecordDict({"config": ConfigRecord({})}),
                    dst_node_id=node,
                    message_type="query.export",
                    group_id="export",
                )
                for node in self.node_users(parts)
            ],
        )
        full = FederationState(self.model, self.n_users, self.cfg.seed)
        for plugin in self.plugins:
            full.add_scalars(plugin.client.state_init)
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to export: {reply.error.reason}")
            part = wire.unpack(reply.content.array_records["arrays"])
            kept_round = int(part.pop("meta/round"))
            if kept_round != round_:
                raise RuntimeError(
                    f"node {reply.metadata.src_node_id} kept round {kept_round}, not the best round {round_}"
                )
            users = part["clients"].numpy()
            node_state = FederationState(self.model, len(users), self.cfg.seed, clients=users)
            node_state.load_private_tensors(part)
            for user in users.tolist():
                full.save(user, node_state.load(user))
        return round_, {**tensors, **client_tensors(full.private_tensors())}, infos

    def wire_bytes_per_client(self) -> dict[str, float]:
        """Mean bytes of tensors per trained client per round, each way, as sent over Flower."""
        n = max(self.bytes["clients"], 1)
        return {"down": self.bytes["down"] / n, "up": self.bytes["up"] / n}
