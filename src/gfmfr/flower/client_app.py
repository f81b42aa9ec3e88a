"""The ClientApp: what a SuperNode runs (``gfmfr.flower.client_app:app``).

Five message types: ``query`` (which partition are you?), ``train`` (train these of your users
for round t, from these shared parameters and hints; reply with their uploads, one per user when
a plug-in asks for them this round, else folded into one partial aggregate) and ``evaluate``
(rank every one of your users' held-out items; reply with metric sums); and, for the saved model,
``query.snapshot`` (keep your users' private state: this round is the best so far) and
``query.export`` (send the state you kept; only when the run saves its model). The node's partition
comes from its node config (``partition-id``, ``num-partitions``, and ``state-dir`` where its
users' private state is kept); the run's configuration from the run config (``config`` as TOML
text, or ``config-file``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from gfmfr.config import FederationConfig
from gfmfr.federation.messages import Hints, LocalUpdate, Params
from gfmfr.federation.validation import keep_screened, screening
from gfmfr.flower import secure, wire
from gfmfr.flower.node import Node, run_config_of
from gfmfr.runtime import use_threads

_NODES: dict[tuple[int, int], Node] = {}
"""The nodes this process serves, by (run id, partition)."""


def node_of(context: Context, overrides: dict[str, Any] | None = None) -> Node:
    """This process's copy of the node ``context`` names, built on first use and brought to the
    generation the context records."""
    settings = {**context.run_config, **(overrides or {})}
    partition = int(context.node_config["partition-id"])
    partitions = int(context.node_config["num-partitions"])
    key = (context.run_id, partition)
    if key not in _NODES:
        cfg = run_config_of(settings)
        use_threads(cfg.runtime.threads)
        state_dir = context.node_config.get("state-dir") or settings.get("state-root")
        if state_dir and "state-dir" not in context.node_config:
            state_dir = f"{state_dir}/node-{partition}"
        if state_dir:
            state_dir = f"{state_dir}/run-{context.run_id}"
        _NODES[key] = Node.build(cfg, partition, partitions, state_dir)
    node = _NODES[key]
    record = context.state.config_records.get("gfmfr")
    node.sync(int(wire.scalar(record, "generation")) if record is not None else 0)
    return node


def query(message: Message, context: Context, overrides: dict[str, Any] | None = None) -> Message:
    partition = int(context.node_config["partition-id"])
    partitions = int(context.node_config["num-partitions"])
    return Message(
        RecordDict({"node": MetricRecord({"partition-id": partition, "num-partitions": partitions})}), reply_to=message
    )


def train(message: Message, context: Context, overrides: dict[str, Any] | None = None) -> Message:
    node = node_of(context, overrides)
    round_, shared, users, hints, want, sigma = wire.decode_train(message.content)
    node.set_shared(shared)
    dp = node.cfg.privacy.mode != "off"
    fed = screening(node.cfg.federation, dp)
    if node.cfg.privacy.secure_aggregation:
        reply = secure_train(node, context, message, round_, shared, users, hints, want, sigma, fed, dp)
        return Message(reply, reply_to=message)
    update = node.train(round_, users, hints, want, sigma)
    context.state["gfmfr"] = ConfigRecord({"generation": node.persist()})
    if not want:  # no plug-in needs its clients one by one: the node's partial aggregate of the uploads it keeps
        kept, rejected = keep_screened(update, shared, fed)
        # under DP every row is sent: which rows the clients trained is what DP hides
        return Message(
            wire.encode_sums(kept, shared, fed.weighted_aggregation, fed.upload == "dense" or dp, rejected),
            reply_to=message,
        )
    if fed.upload == "dense" or dp:
        update = update.dense(shared)
    return Message(wire.encode_update(update), reply_to=message)


def secure_train(
    node: Node,
    context: Context,
    message: Message,
    round_: int,
    shared: Params,
    users: np.ndarray,
    hints: tuple[Hints, ...],
    want: bool,
    sigma: float,
    fed: FederationConfig,
    dp: bool,
) -> RecordDict:
    """Training under secure aggregation (:mod:`gfmfr.flower.secure`). SecAgg+'s training step: the node's
    vector, which ``secure_mod`` masks before it leaves. A grouping round's first step (a plain training
    message): the kept clients' head signatures alone. Training is idempotent, so the second step of a
    grouping round sums the uploads the first step trained."""
    update = node.train(round_, users, hints, want, sigma) if len(users) else None
    context.state["gfmfr"] = ConfigRecord({"generation": node.persist()})
    kept, rejected = keep_screened(update, shared, fed) if update is not None else (LocalUpdate.empty(), 0)
    if (dp or fed.upload == "dense") and len(kept.users):  # every row counts as trained: DP hides which were
        kept = kept.dense(shared)
    if not secure.is_secure(message):
        if not want:
            raise RuntimeError("under secure aggregation a round's uploads come through SecAgg+ only")
        return wire.encode_signatures(kept)
    grouping = wire.decode_groups(message.content)
    labels, groups = None, 0
    if grouping is not None:
        grouped, group_of, groups = grouping
        label_of = dict(zip(grouped.tolist(), group_of.tolist()))
        labels = np.array([label_of[u] for u in kept.users.tolist()], np.int64)
    layout = secure.Layout(
        tuple(sorted(shared)),
        tuple(f for t in node.terms for f in t.figures),
        node.model.kinds.shared_tables,
        groups,
        node.model.item_table,
    )
    vector = secure.node_vector(kept, shared, layout, len(users), rejected, labels)
    partition = int(context.node_config["partition-id"])
    np.random.seed(secure.rounding_seed(node.cfg.seed, round_, partition))  # the mod's stochastic rounding
    return secure.fitres(vector, len(users))


def evaluate(message: Message, context: Context, overrides: dict[str, Any] | None = None) -> Message:
    node = node_of(context, overrides)
    node.set_shared({k.split("/", 1)[1]: v for k, v in wire.unpack(message.content.array_records["arrays"]).items()})
    sums = node.evaluate(str(message.content.config_records["config"]["split"]))
    return Message(RecordDict({"sums": wire.metric_record(sums)}), reply_to=message)


def snapshot(message: Message, context: Context, overrides: dict[str, Any] | None = None) -> Message:
    node = node_of(context, overrides)
    round_ = int(wire.scalar(message.content.config_records["config"], "round"))
    node.snapshot(round_)
    return Message(RecordDict({"kept": MetricRecord({"round": round_})}), reply_to=message)


def export(message: Message, context: Context, overrides: dict[str, Any] | None = None) -> Message:
    node = node_of(context, overrides)
    return Message(RecordDict({"arrays": wire.pack(node.exported())}), reply_to=message)


def make_client_app(overrides: dict[str, Any] | None = None, mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` stand in for run-config entries (the simulation passes the config so);
    ``mods`` are Flower mods stacked on it (each sees every message, in order, before the handler); the
    last is always :func:`gfmfr.flower.secure.secure_mod`, SecAgg+ on the messages of its protocol."""
    client = ClientApp(mods=[*(mods or []), secure.secure_mod])
    client.query()(lambda message, context: query(message, context, overrides))
    client.train()(lambda message, context: train(message, context, overrides))
    client.evaluate()(lambda message, context: evaluate(message, context, overrides))
    client.query("snapshot")(lambda message, context: snapshot(message, context, overrides))
    client.query("export")(lambda message, context: export(message, context, overrides))
    return client


app = make_client_app()
