"""Secure aggregation on Flower: the nodes' updates summed under SecAgg+ (``privacy.secure_aggregation``).

Flower's SecAgg+ (Bell et al., CCS 2020; :class:`~flwr.server.workflow.SecAggPlusWorkflow` on the
server, :func:`~flwr.client.mod.secaggplus_mod` on the nodes) masks each node's vector with pairwise
and private masks that cancel only in the sum over the round's nodes, and recovers the masks of
nodes that drop out mid-round from the secret shares of their neighbours. The server learns the
sum and nothing else of any node's vector.

What a node puts in its vector (:func:`node_vector`), in a fixed layout the server knows:

- per shared parameter (item tables whole, no item ids), the sum over its clients of their update
  (upload minus the broadcast), over ``n``, its number of sampled clients;
- per shared item table, how many of its clients trained each row, over ``n`` (the server's
  row-wise optimiser and GFMFR's content prior use the counts; the sum tells no client's rows);
- its clients that passed screening, those rejected, and their local losses and plug-in figures
  (divided by :data:`SCALE`), each over ``n``;
- in a GFMFR server round, per group g its clients' summed item-table updates [G, items, d] and
  the group's size, over ``n``. The groups come from the signatures the nodes sent in the clear
  first (:func:`gfmfr.flower.wire.encode_signatures`), clipped and noised on the client under
  ``privacy.signature_noise``.

Flower weights each node's vector by ``n / N`` (``N`` the round's sampled clients, which the server
knows: it sampled them) and divides by the weights of the nodes that finished, so the server gets the
sums over the clients of every node that finished, over their number; :func:`decode` turns them back
into what :class:`~gfmfr.federation.aggregation.RoundAggregate` takes from a node's plain partial
aggregate. Every node takes part in every round (one without sampled clients sends zeros with weight
0), so that a round has the nodes SecAgg+ needs even when few clients are sampled.

Quantisation (Flower's): each entry is clipped to ``[-CLIP, CLIP]`` and stochastically rounded to a
grid of ``2 CLIP / Q`` with ``Q = 2^32 / 2^ceil(log2(nodes + 1))`` (so the sum of every node's
integers fits Flower's 2^32 modulus): an unbiased error of at most ``2 CLIP / Q`` per node and entry.
A node seeds the rounding from the run's seed, the round and its partition, so a run is reproducible.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    NDArrays,
    Parameters,
    ReconnectIns,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from gfmfr.federation.aggregation import FedAvg, group_sums
from gfmfr.federation.messages import LocalUpdate, Params

log = logging.getLogger(__name__)

CLIP = 8.0
"""Flower's clipping range: every entry of a node's vector lies in [-CLIP, CLIP] before quantisation."""
SCALE = 1024.0
"""Losses and figures are sent divided by this, to stay inside the clipping range (a client's mean
local loss or its summed figures can exceed CLIP; their error is then SCALE times an update's)."""
MODULUS = 2**32
"""Flower's masking modulus (its largest)."""


def quantisation(nodes: int) -> int:
    """Q: the quantisation range for ``nodes`` nodes, the largest power of 2 whose sum over them fits the
    modulus."""
    return MODULUS >> max(1, math.ceil(math.log2(nodes + 1)))


def error_bound(nodes: int) -> float:
    """The largest quantisation error of one entry of the aggregated vector (a mean over the clients),
    when every node finishes: ``nodes`` times one grid step."""
    return nodes * 2 * CLIP / quantisation(nodes)


@dataclass(frozen=True)
class Layout:
    """The vector's blocks, which server and nodes derive alike from the run."""

    names: tuple[str, ...]
    """The shared parameters, sorted."""
    figures: tuple[str, ...]
    """The plug-ins' client figures, in order."""
    tables: tuple[str, ...]
    """The shared item tables, whose rows' counts of the clients that trained them are summed too."""
    groups: int = 0
    """Groups of this server round (0: not a grouping round)."""
    table: str = ""
    """The item table the groups sum (a grouping round)."""


def node_vector(
    update: LocalUpdate,
    shared: Params,
    layout: Layout,
    clients: int,
    rejected: int,
    labels: np.ndarray | None = None,
) -> NDArrays:
    """One node's vector (see the module docstring): ``update`` holds its clients that passed screening,
    ``clients`` how many it was sent, ``labels`` the group of each client of ``update`` (a grouping
    round)."""
    n = max(clients, 1)
    out: NDArrays = []
    agg = FedAvg(False)
    if len(update.users):
        agg.add(update, shared)
    for name in layout.names:
        delta = agg.sums[name] - agg.total * shared[name] if name in agg.sums else torch.zeros_like(shared[name])
        out.append((delta / n).numpy().astype(np.float64).reshape(-1, *delta.shape[1:]))  # no 0-d array
    for name in layout.tables:
        touches = np.bincount(update.row_item, minlength=len(shared[name])) if name in update.rows else 0
        out.append(np.zeros(len(shared[name])) + touches / n)
    scalars = [agg.total / n, rejected / n, float(update.loss.sum()) / n / SCALE]
    scalars += [float(update.metrics[k].sum()) / n / SCALE if k in update.metrics else 0.0 for k in layout.figures]
    out.append(np.asarray(scalars, np.float64))
    if layout.groups:
        assert labels is not None
        g = shared[layout.table]
        sums = torch.zeros(layout.groups, *g.shape)
        if len(update.users):
            sums = group_sums(update, {layout.table: g}, labels, layout.groups)[layout.table]
        counts = torch.from_numpy(np.bincount(labels, minlength=layout.groups).astype(np.float32))
        out.append(((sums - counts.view(-1, *([1] * g.dim())) * g[None]) / n).numpy().astype(np.float64))
        out.append((counts / n).numpy().astype(np.float64))
    return out


@dataclass
class Aggregate:
    """What the server learns from one round's secure sum (:func:`decode`)."""

    sums: Params
    """Per shared parameter, the sum of the kept clients' uploads (FedAvg's numerator)."""
    total: float
    """Clients kept (FedAvg's denominator)."""
    touches: dict[str, torch.Tensor]
    """Per shared item table, how many kept clients trained each row (none of them says which)."""
    loss_sum: float
    clients: int
    """Clients of the nodes that finished the round."""
    rejected: int
    figures: dict[str, float]
    group_sums: torch.Tensor | None
    """[G, items, d] the groups' summed uploads of the item table (a grouping round)."""
    group_counts: torch.Tensor | None
    """[G] the groups' sizes (a grouping round)."""


def decode(vector: NDArrays, clients: int, shared: Params, layout: Layout) -> Aggregate:
    """The sums behind the aggregated ``vector`` (a mean over ``clients``, those of the nodes that
    finished), from the ``shared`` parameters the round broadcast."""
    arrays = [torch.from_numpy(np.asarray(a, np.float64)) for a in vector]
    k = len(layout.names) + len(layout.tables)
    scalars = arrays[k].tolist()
    total = scalars[0] * clients
    sums = {
        name: (total * shared[name].double() + clients * arrays[i].reshape(shared[name].shape)).to(shared[name].dtype)
        for i, name in enumerate(layout.names)
    }
    touches = {name: (arrays[len(layout.names) + i] * clients).round() for i, name in enumerate(layout.tables)}
    figures = {f: scalars[3 + j] * clients * SCALE for j, f in enumerate(layout.figures)}
    group, counts = None, None
    if layout.groups:
        counts = (arrays[k + 2] * clients).round().float()
        g = shared[layout.table]
        group = (counts.view(-1, *([1] * g.dim())) * g[None] + clients * arrays[k + 1].float()).float()
    return Aggregate(
        sums,
        round(total),
        touches,
        scalars[2] * clients * SCALE,
        clients,
        round(scalars[1] * clients),
        figures,
        group,
        counts,
    )


def secure_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's :func:`~flwr.client.mod.secaggplus_mod` on the messages of the SecAgg+ protocol; every
    other message passes through (a ClientApp carries it always; the server decides)."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def is_secure(message: Message) -> bool:
    """Whether ``message`` is SecAgg+'s (its training step: the handler's reply is masked by the mod)."""
    return RECORD_KEY_CONFIGS in message.content.config_records


def fitres(vector: NDArrays, clients: int) -> RecordDict:
    """A node's reply to SecAgg+'s training step: its vector and weight as the mod reads them (the mod
    masks the vector and clears it from the reply)."""
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), clients, {})
    return compat.fitres_to_recorddict(res, keep_input=False)


def rounding_seed(seed: int, round_: int, partition: int) -> int:
    """The seed of a node's stochastic rounding in ``round_`` (the mod rounds with NumPy's global
    generator, right after the handler returns)."""
    return (seed * 1_000_003 + round_ * 7_919 + partition) % 2**32


class _Node(ClientProxy):
    """A node, as Flower's legacy workflow names it (it only reads ``node_id``)."""

    def __init__(self, node_id: int):
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins: GetPropertiesIns, timeout: float | None, group_id: int | None) -> GetPropertiesRes:
        raise NotImplementedError

    def get_parameters(self, ins: GetParametersIns, timeout: float | None, group_id: int | None) -> GetParametersRes:
        raise NotImplementedError

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        raise NotImplementedError

    def evaluate(self, ins: EvaluateIns, timeout: float | None, group_id: int | None) -> EvaluateRes:
        raise NotImplementedError

    def reconnect(self, ins: ReconnectIns, timeout: float | None, group_id: int | None) -> DisconnectRes:
        raise NotImplementedError


class _Collector(LegacyStrategy):
    """The legacy strategy the SecAgg+ workflow calls: it names the round's nodes and keeps the sum."""

    def __init__(self, nodes: Sequence[int]):
        self.nodes = list(nodes)
        self.results: list[tuple[ClientProxy, FitRes]] | None = None
        self.failures = 0

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(_Node(n), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results, self.failures = results, len(failures)
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list, failures: list
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, sending each node the project's training message for its step."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs: float | int | None):
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.contents = contents

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {n: self.contents[n] for n in state.nid_to_fitins}
        return ok


@dataclass
class SecureResult:
    """One SecAgg+ round, as the server sees it."""

    vector: NDArrays
    """The mean over ``clients`` of the nodes' vectors (Flower's weighted average, weights ``n / N``)."""
    clients: int
    """Clients of the nodes that finished."""
    nodes: int
    """Nodes that finished."""
    dropped: int
    """Nodes that dropped out during the round (their masks recovered from their neighbours' shares)."""
    seconds: float


def secure_round(
    grid: Grid,
    server_round: int,
    contents: dict[int, RecordDict],
    clients: dict[int, int],
    neighbours: int,
    threshold: float,
    timeout: float | None,
) -> SecureResult:
    """Run SecAgg+ over ``contents`` (node id -> its training message) for one round; ``clients``: node
    id -> how many sampled clients it was sent; each node shares its secrets with ``neighbours`` nodes (all
    when fewer). Raises if too few nodes finish to unmask the sum."""
    t0 = time.perf_counter()
    nodes = sorted(contents)
    total = max(sum(clients.values()), 1)
    collector = _Collector(nodes)
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=collector)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _Workflow(
        contents,
        num_shares=1.0 if neighbours >= len(nodes) else neighbours | 1,  # Flower wants an odd count of fewer
        reconstruction_threshold=float(threshold),
        max_weight=float(total),
        clipping_range=CLIP,
        quantization_range=quantisation(len(nodes)),
        modulus_range=MODULUS,
        timeout=timeout,
    )
    workflow(grid, context)
    if collector.results is None:
        raise RuntimeError(
            f"secure aggregation halted in round {server_round - 1}: too few of the {len(nodes)} nodes "
            f"answered to unmask the sum (privacy.secagg_threshold = {threshold}); Flower's log says which stage"
        )
    finished = collector.results
    weight = sum(res.num_examples for _, res in finished)
    vector = parameters_to_ndarrays(finished[0][1].parameters) if finished else []
    return SecureResult(vector, weight, len(finished), len(nodes) - len(finished), time.perf_counter() - t0)
