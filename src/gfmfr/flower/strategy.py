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

Flower's own loop (:meth:`~flwr.serverapp.strategy.Strategy.start`) drives the rounds; the hooks
select the best round on validation and stop early as :meth:`gfmfr.federation.engine.Federation.fit`
does (test metrics are asked for only at a new best validation round; a run that is over ends
Flower's loop). :meth:`FedRecStrategy.fit` hands ``start`` a :class:`PartitionGrid`, which sends a
message again to the node that serves its partition now if the first did not answer. When the run
saves its model, a new best round also has every node
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
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

from gfmfr.config import RunConfig
from gfmfr.data.dataset import Dataset
from gfmfr.eval.evaluator import metrics_from_sums
from gfmfr.eval.selection import BestRound
from gfmfr.federation.aggregation import RoundAggregate
from gfmfr.federation.checkpoint import client_tensors, server_tensors
from gfmfr.federation.engine import participants, privacy_setup
from gfmfr.federation.history import RoundLog
from gfmfr.federation.messages import GroupedUploads, LocalUpdate
from gfmfr.federation.plugin import Plugin, wants_signatures
from gfmfr.federation.rounds import close_training, over_before, record_validation, round_line, validates
from gfmfr.federation.server_steps import build_server_optimizer
from gfmfr.federation.state import FederationState
from gfmfr.flower import secure, wire
from gfmfr.flower.node import partition_users
from gfmfr.models.base import FederatedRecommender

log = logging.getLogger(__name__)


class Finished(Exception):
    """Raised by a hook once the run is over (early stopping, the privacy budget spent): it ends
    Flower's round loop, which knows no early stopping."""


class ForwardingGrid(Grid):
    """A grid that hands everything to the grid it wraps; subclasses change ``send_and_receive``."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)


class CountingGrid(ForwardingGrid):
    """A grid that adds the bytes of what it sends and receives to ``counts`` (``down`` and ``up``)."""

    def __init__(self, grid: Grid, counts: dict[str, int]):
        super().__init__(grid)
        self.counts = counts

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        self.counts["down"] += sum(record_bytes(m.content) for m in sent)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        self.counts["up"] += sum(record_bytes(r.content) for r in replies if not r.has_error())
        return replies


class PollingGrid(ForwardingGrid):
    """``send_and_receive`` as Flower's grids do it (push, then pull until every reply is in or the
    timeout passes), asking for replies after 20 ms, then 1.5 times later each time up to every second,
    instead of every 3 s (Flower 1.41's deployed grid, :class:`~flwr.superlink.grid.http_grid.HttpGrid`):
    a reply that is in is seen at once."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = 0.02
        while waiting and (deadline is None or time.monotonic() < deadline):
            got = list(self.grid.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(pause)
                pause = min(1.5 * pause, 1.0)
        return replies


class PartitionGrid(ForwardingGrid):
    """A grid whose ``send_and_receive`` gets one reply per partition: a message whose node does not
    answer (it died) is sent again to the node that serves its partition then
    (:meth:`FedRecStrategy.exchange`). Everything else is the wrapped grid's."""

    def __init__(self, grid: Grid, strategy: FedRecStrategy):
        super().__init__(grid)
        self.strategy = strategy

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        if not sent:
            return []

        def make(partitions: set[int] | None) -> list[Message]:
            if partitions is None:
                return sent
            node_of = {p: n for n, p in self.strategy.partition_of.items()}
            return [
                Message(
                    m.content,
                    dst_node_id=node_of[part],
                    message_type=m.metadata.message_type,
                    group_id=m.metadata.group_id,
                )
                for m in sent
                if (part := self.strategy.partition_seen.get(m.metadata.dst_node_id)) in partitions
            ]

        return self.strategy.exchange(self.grid, make)


def raw(grid: Grid | None) -> Grid:
    """The grid under a :class:`PartitionGrid` (the strategy's own exchanges resend by themselves)."""
    if grid is None:
        raise RuntimeError("no grid yet: the strategy's hooks run inside Flower's loop")
    return grid.grid if isinstance(grid, PartitionGrid) else grid


def metric_sums(replies: Iterable[Message]) -> dict[str, float]:
    """The metrics of the nodes' metric sums (:func:`gfmfr.eval.evaluator.metrics_from_sums`)."""
    parts = []
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to evaluate: {reply.error.reason}")
        parts.append(wire.numbers(reply.content.metric_records["sums"]))
    return metrics_from_sums(parts)


def record_bytes(content: RecordDict) -> int:
    """Bytes of the tensors a message carries, and of the byte strings in its config records (SecAgg+'s
    keys, shares and masked vectors): what dominates its size on the wire."""
    arrays = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    strings = 0
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                strings += len(value)
            elif isinstance(value, list):
                strings += sum(len(v) for v in value if isinstance(v, bytes))
    return arrays + strings


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
        self.partition_seen: dict[int, int] = {}
        """Node id -> the partition it hosted, for every node seen (a dead node's messages go to its
        partition's new node)."""
        self.unavailable: set[int] = set()
        """Nodes listed by the grid that a discovery query found gone (dead; a restart gets a new id)."""
        self.best = BestRound(cfg.eval.select_metric, cfg.federation.early_stop_patience)
        self.finished = False
        """The run is over: early stopping or the privacy budget (the hooks then end Flower's loop)."""
        self.entry: RoundLog | None = None
        """The round being logged, between training and validation."""
        self.started = 0.0
        self.grid: Grid | None = None
        """The grid Flower's loop hands the hooks (test metrics and snapshots go through it)."""
        self.partitions = 0
        self.history: list[RoundLog] = []
        self.rejected = 0
        """Uploads rejected in the last round aggregated (by the server, or by nodes before they sum)."""
        self.bytes = {"down": 0, "up": 0, "clients": 0}
        self.secure: tuple[secure.Aggregate, tuple[Plugin, np.ndarray, torch.Tensor, np.ndarray] | None] | None = None
        """Under secure aggregation: the round's secure sum, between training and aggregation."""
        self.ledger, self.noise = privacy_setup(cfg, self.n_users, model, plugins)

    # ---- nodes ---------------------------------------------------------------------------------
    def discover(self, grid: Grid) -> None:
        """Wait until a node serves every partition; learn which node serves which."""
        deadline = time.monotonic() + self.node_wait
        while True:
            nodes = set(grid.get_node_ids())
            # a node seen before and replaced, or one that did not answer, is dead (a restart gets a new id)
            new = [n for n in nodes if n not in self.partition_seen and n not in self.unavailable]
            if new:
                messages = [
                    Message(RecordDict({"q": ConfigRecord({})}), dst_node_id=n, message_type="query", group_id="setup")
                    for n in new
                ]
                replies = list(grid.send_and_receive(messages, timeout=self.timeout))
                sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set when pushed
                for reply in replies:
                    if reply.has_error():  # listed, but gone (the SuperLink has not noticed yet): skip it
                        gone = sent_to.get(reply.metadata.reply_to_message_id)
                        log.warning("node %s did not answer the discovery query: %s", gone, reply.error.reason)
                        if gone is not None:
                            self.unavailable.add(gone)
                        continue
                    info = reply.content.metric_records["node"]
                    partition = int(wire.scalar(info, "partition-id"))
                    # a restarted node comes back under a new id: the newest serves the partition
                    self.partition_of = {n: p for n, p in self.partition_of.items() if p != partition}
                    self.partition_of[reply.metadata.src_node_id] = partition
                    self.partition_seen[reply.metadata.src_node_id] = partition
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
    ) -> Iterable[Message]:
        round_ = server_round - 1
        self.grid = grid
        self.discover(raw(grid))  # a node that restarted comes back under a new id
        if self.finished or over_before(self.ledger, round_):
            raise Finished
        self.started = time.perf_counter()
        users = self.sampled(round_)
        want = wants_signatures(self.plugins, round_)
        shared = {n: self.shared[n] for n in self.model.kinds.uploaded}
        if self.cfg.privacy.secure_aggregation:  # the round's exchange is SecAgg+'s, run here
            self.secure = self.secure_train(raw(grid), server_round, users, want, shared)
            return []
        messages = []
        for node, hosted in self.node_users().items():
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
        t1 = time.perf_counter()
        agg = RoundAggregate(
            self.cfg.federation, self.plugins, self.shared, round_, self.noise, self.ledger is not None
        )
        updates = []
        if self.secure is not None:
            self.fold_secure(agg, self.secure)
            self.secure = None
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
        seconds = {"train": t1 - self.started, "aggregate": time.perf_counter() - t1}
        clients = len(self.sampled(round_))
        self.shared, self.entry = close_training(
            self.plugins, self.model, self.shared, round_, clients, loss, seconds, self.rejected
        )
        if self.ledger is not None:
            self.entry.epsilon = self.ledger.spend(round_)
        self.heartbeat()
        if not validates(self.cfg.federation, round_):
            log.info(*round_line(self.entry))
            self.history.append(self.entry)
        return None, MetricRecord({"loss": loss})

    def secure_train(
        self, grid: Grid, server_round: int, users: np.ndarray, want: bool, shared: dict[str, torch.Tensor]
    ) -> tuple[secure.Aggregate, tuple[Plugin, np.ndarray, torch.Tensor, np.ndarray] | None]:
        """One round's training under secure aggregation (:mod:`gfmfr.flower.secure`): every node takes
        part. In a grouping round the nodes first send their clients' head signatures in the clear and
        the plug-in groups them; then SecAgg+ sums the nodes' vectors (with, in a grouping round, their
        groups' item tables)."""
        round_ = server_round - 1
        hosted = self.node_users()
        if len(hosted) < 2:
            raise RuntimeError("secure aggregation needs at least 2 nodes (runtime.nodes)")
        counting = CountingGrid(grid, self.bytes)
        sigma = self.ledger.sigma if self.ledger is not None and self.cfg.privacy.mode == "local" else 0.0
        mine = {node: users[np.isin(users, h)] for node, h in hosted.items()}

        def content(node: int) -> RecordDict:
            hints = tuple(p.server.hints(mine[node], round_) for p in self.plugins)
            return wire.encode_train(round_, shared, mine[node], hints, want, sigma)

        grouped = None
        groups = 0
        if want:  # the signatures, in the clear; the plug-in groups the clients by them
            grouper = [p for p in self.plugins if p.server.wants_signatures(round_)]
            if len(grouper) != 1:
                raise RuntimeError("secure aggregation groups clients for one plug-in only")
            replies = self.exchange(
                counting,
                lambda parts: [
                    Message(content(node), dst_node_id=node, message_type="train", group_id=f"{server_round}-groups")
                    for node in self.node_users(parts)
                    if len(mine[node])
                ],
            )
            parts = [wire.decode_signatures(r.content) for r in replies]
            parts = [p for p in parts if len(p[0])]
            signed = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
            signatures = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, 0)
            labels = grouper[0].server.group(signed, signatures, round_) if len(signed) else np.empty(0, np.int64)
            grouped, groups = (grouper[0], signed, signatures, labels), grouper[0].server.groups

        contents = {}
        for node in hosted:
            contents[node] = content(node)
            if grouped is not None:
                on_node = np.isin(grouped[1], mine[node])
                wire.encode_groups(contents[node], grouped[1][on_node], grouped[3][on_node], groups)
        self.bytes["clients"] += len(users)
        p = self.cfg.privacy
        result = secure.secure_round(
            counting,
            server_round,
            contents,
            {node: len(mine[node]) for node in hosted},
            p.secagg_neighbours,
            p.secagg_threshold,
            self.timeout,
        )
        self.heartbeat()
        if result.dropped:
            log.warning("round %d: %d node(s) dropped out of secure aggregation", round_, result.dropped)
        layout = secure.Layout(
            tuple(sorted(shared)),
            tuple(f for p in self.plugins for f in p.client.figures),
            self.model.kinds.shared_tables,
            groups,
            self.model.item_table,
        )
        return secure.decode(result.vector, result.clients, shared, layout), grouped

    def fold_secure(
        self,
        agg: RoundAggregate,
        result: tuple[secure.Aggregate, tuple[Plugin, np.ndarray, torch.Tensor, np.ndarray] | None],
    ) -> None:
        """Fold a round's secure sum into the server's aggregate (and a grouping plug-in's groups)."""
        total, grouped = result
        trained = {n: t > 0 for n, t in total.touches.items()}
        agg.add_sums(total.sums, total.total, trained, total.loss_sum, total.clients, total.figures, total.rejected)
        if grouped is not None and total.group_sums is not None and total.group_counts is not None:
            plugin, users, signatures, labels = grouped
            touches = total.touches[self.model.item_table]
            sums = GroupedUploads(users, signatures, labels, total.group_sums, total.group_counts, touches)
            plugin.server.observe_groups(sums, self.shared)

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
        if "split" not in config:  # Flower's loop: validation, in the rounds that validate
            if not validates(self.cfg.federation, server_round - 1):
                return []
            config = ConfigRecord({"split": "valid"})
            self.started = time.perf_counter()
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
        """Validation: the round's metrics, the best round so far (test metrics when it is new), and
        early stopping."""
        replies = list(replies)
        if not replies or self.entry is None:
            return None
        round_, entry = server_round - 1, self.entry
        valid = metric_sums(replies)
        self.heartbeat()
        test = functools.partial(self.evaluate, raw(self.grid), server_round, "test")
        keep = functools.partial(self.snapshot, raw(self.grid)) if self.keep_best else None
        record_validation(self.best, entry, valid, time.perf_counter() - self.started, test, keep)
        log.info(*round_line(entry))
        self.history.append(entry)
        self.finished = self.best.stop(round_)
        return wire.metric_record(valid)

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
        """Metrics of ``split`` summed over every node's users."""

        def messages(parts: set[int] | None) -> list[Message]:
            config = ConfigRecord({"split": split})
            return list(self.configure_evaluate(server_round, ArrayRecord(), config, grid, parts))

        return metric_sums(self.exchange(grid, messages))

    def fit(self, grid: Grid) -> dict[str, Any]:
        """Every round, driven by Flower's loop, with selection on validation; returns the summary
        (the per-round log is :attr:`history`)."""
        if isinstance(grid, HttpGrid):  # a deployed ServerApp's grid, which asks for replies every 3 s
            grid = PollingGrid(grid)
        self.discover(grid)
        try:
            self.start(
                PartitionGrid(grid, self), ArrayRecord(), num_rounds=self.cfg.federation.rounds, timeout=self.timeout
            )
        except Finished:
            log.info("the run is over after round %d", self.history[-1].round if self.history else -1)
        return self.best.summary()

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
