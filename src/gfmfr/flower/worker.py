"""``gfmfr node-worker``: one long-lived process that runs a deployed SuperNode's ClientApp tasks.

Flower 1.41's SuperNode, in its default ``subprocess`` isolation, starts a ``flwr-clientapp`` process
for every message it receives: each imports torch and the project, reads the node's data and builds
its model again (seconds a message). With ``--isolation process`` the SuperNode only serves its
Runtime API (``--clientappio-api-address``) and leaves running the tasks to a process of the user's
choice. This module is that process for this project's ClientApp
(:data:`gfmfr.flower.client_app.app`): it asks the SuperNode for a task (Flower's ``AcquireTask``),
runs it here, pushes the reply and the node's Flower context back, and asks again. The node's
data, model and users' state stay in this process from one message to the next (the state file in
the node's ``state-dir`` is still written after every round, so a restarted worker carries on).

It speaks the Runtime API through Flower's own client and message codecs, as Flower's
``flwr-clientapp`` does for one task; the ClientApp is the project's, imported once (no FAB is
installed: the worker serves this package as it is installed).

    flower-supernode --insecure --superlink HOST:9092 --isolation process \\
        --clientappio-api-address 127.0.0.1:9094 --node-config "partition-id=0 num-partitions=3 state-dir=..."
    gfmfr node-worker --runtime-api-address 127.0.0.1:9094 --insecure
"""

from __future__ import annotations

import logging
import time

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # type: ignore[attr-defined]
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from gfmfr.flower.client_app import app as project_app

log = logging.getLogger(__name__)

APP_ERRORS = (ValueError, TypeError, KeyError, IndexError, RuntimeError, OSError, FloatingPointError)
"""What a ClientApp raising on one message sends back as the reply's error; the worker goes on."""


def runtime_client(address: str, insecure: bool, certificates: str | None, token: str | None) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API (as a task's executor, with ``token``; else as the
    process that acquires tasks)."""
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "flower-superexec")
    ]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=None if insecure else certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(app: ClientApp, address: str, token: str, insecure: bool, certificates: str | None) -> bool:
    """Run the task ``token`` names with ``app``: pull its message and context, reply, push the context
    back. Whether the ClientApp completed (an error it raised is sent back as the message's error)."""
    client = runtime_client(address, insecure, certificates, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context: Context | None = None
    status, details, reply = SubStatus.FAILED, "", None
    try:
        message, context, _, _ = pull_task_input(client)
        try:
            reply = app(message=message, context=context)
            status = SubStatus.COMPLETED
        except APP_ERRORS as exc:  # the server gets the error, as from Flower's own ClientApp process
            log.exception("the ClientApp raised on a %s message", message.metadata.message_type)
            details = f"{type(exc)}:<'{exc}'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        push_message(client, reply, context)
    finally:
        push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()
    return status == SubStatus.COMPLETED


def serve(address: str, insecure: bool = True, certificates: str | None = None, poll: float = 0.02) -> None:
    """Run the SuperNode's ClientApp tasks at ``address`` until stopped, asking for a task every ``poll``
    seconds while there is none."""
    acquire = runtime_client(address, insecure, certificates, None)
    try:
        while True:
            try:
                res = acquire.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            except httpx.HTTPError as exc:  # the SuperNode is not up yet, or restarting
                log.debug("no Runtime API at %s yet: %s", address, exc)
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                run_task(project_app, address, res.token, insecure, certificates)
            else:
                time.sleep(poll)
    finally:
        acquire.close()
