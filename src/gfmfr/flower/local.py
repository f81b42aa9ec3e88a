"""A Grid in this process: the ServerApp's messages go straight to ClientApps, one Flower
:class:`~flwr.app.Context` per node, with no Ray and no network. Messages are Flower records as
on the wire. For tests (many node counts in seconds), and to time our own code apart from Flower's
transport (``benchmarks/flower_overhead.py``).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from gfmfr.flower import client_app as client_module


class LocalGrid(Grid):
    """``nodes`` nodes, node ``p`` hosting partition ``p``, each running ``client``."""

    def __init__(self, client: ClientApp, nodes: int, node_config: dict[str, Any] | None = None, run_id: int = 1):
        self.client = client
        self.run_id = run_id
        # this process is the server's: messages it creates carry its identity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self._ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._node_config = dict(node_config or {})
        self.contexts: dict[int, Context] = {}
        for p in range(nodes):
            self.start(p, nodes)
        self._replies: dict[str, Message] = {}

    def start(self, partition: int, partitions: int) -> int:
        """Start a node for ``partition`` under a new node id (as a restarted SuperNode gets)."""
        node_id = next(self._ids)
        config = {"partition-id": partition, "num-partitions": partitions, **self._node_config}
        if "state-dir" in config:
            config["state-dir"] = f"{config['state-dir']}/node-{partition}"
        self.contexts[node_id] = Context(self.run_id, node_id, config, RecordDict(), {})
        return node_id

    def restart(self, node_id: int) -> int:
        """Kill node ``node_id`` (its process memory and Flower context are lost) and start it again."""
        context = self.contexts.pop(node_id)
        partition = int(context.node_config["partition-id"])
        client_module._NODES.pop((self.run_id, partition), None)
        return self.start(partition, int(context.node_config["num-partitions"]))

    # ---- Grid -------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.run_id = run.run_id

    @property
    def run(self) -> Any:
        return None

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            # an id of its own, as Flower's grid gives a message it pushes (replies name it)
            key = f"local-{next(self._message_ids)}"
            message.metadata.__dict__["_message_id"] = key
            # each node gets its own copy, as over the wire (a ClientApp may change what it receives)
            self._replies[key] = self.client(copy.deepcopy(message), self.contexts[message.metadata.dst_node_id])
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to the messages of ``message_ids`` that are in (all of them: nodes reply at once)."""
        return [self._replies.pop(k) for k in list(message_ids) if k in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
