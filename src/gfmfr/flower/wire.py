"""The project's typed messages as Flower records (:mod:`gfmfr.federation.messages` on the wire).

Tensors travel as :class:`flwr.app.ArrayRecord` entries, named ``kind/name``; scalars as
:class:`flwr.app.ConfigRecord` or :class:`flwr.app.MetricRecord` values. Nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from gfmfr.federation.aggregation import FedAvg
from gfmfr.federation.messages import Hints, LocalUpdate, Params


def pack(values: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """Named tensors (or NumPy arrays) as one record."""
    return ArrayRecord(
        {
            k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().contiguous())
            for k, v in values.items()
        }
    )


def unpack(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def metric_record(values: Mapping[str, float]) -> MetricRecord:
    """Named numbers as a metric record."""
    return MetricRecord({k: float(v) for k, v in values.items()})


def numbers(record: MetricRecord | None) -> dict[str, float]:
    """A metric record's numbers (a TypeError if there is none, or one holds a list)."""
    if record is None:
        raise TypeError("expected a metric record, got none")
    return {k: scalar(record, k) for k in record}


def scalar(record: Mapping[str, Any], key: str) -> float:
    """A number a message's config or metric record carries under ``key``; a TypeError naming the key
    if it carries something else."""
    value = record[key]
    if not isinstance(value, (int, float)):
        raise TypeError(f"message field {key!r}: expected a number, got {type(value).__name__}")
    return value


def encode_train(
    round_: int,
    shared: Params,
    users: np.ndarray,
    hints: tuple[Hints, ...],
    want_signature: bool,
    noise_multiplier: float = 0.0,
) -> RecordDict:
    """What the server sends a node for one round: the shared parameters, the node's sampled users,
    each plug-in's hints for them (only the hint rows they use), and under local DP the noise
    multiplier its clients add (calibrated by the server's accountant)."""
    arrays: dict[str, torch.Tensor | np.ndarray] = {f"shared/{n}": t for n, t in shared.items()}
    arrays["users"] = np.asarray(users, np.int64)
    for k, h in enumerate(hints):
        used = np.unique(h.row[h.row >= 0])
        remap = np.full(max(len(h.table), 1), -1)
        remap[used] = np.arange(len(used))
        arrays[f"hint{k}/table"] = h.table[torch.from_numpy(used)] if len(used) else torch.zeros(0, 0)
        arrays[f"hint{k}/row"] = np.where(h.row >= 0, remap[np.maximum(h.row, 0)], -1).astype(np.int64)
    config = ConfigRecord(
        {
            "round": round_,
            "want-signature": want_signature,
            "hints": len(hints),
            "noise-multiplier": float(noise_multiplier),
        }
    )
    return RecordDict({"arrays": pack(arrays), "config": config})


def decode_train(content: RecordDict) -> tuple[int, Params, np.ndarray, tuple[Hints, ...], bool, float]:
    config, arrays = content.config_records["config"], unpack(content.array_records["arrays"])
    shared = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("shared/")}
    n_hints = int(scalar(config, "hints"))
    hints = tuple(Hints(arrays[f"hint{k}/table"], arrays[f"hint{k}/row"].numpy()) for k in range(n_hints))
    return (
        int(scalar(config, "round")),
        shared,
        arrays["users"].numpy(),
        hints,
        bool(config["want-signature"]),
        float(scalar(config, "noise-multiplier")),
    )


def encode_update(update: LocalUpdate) -> RecordDict:
    """A node's uploads: every field of the stacked :class:`LocalUpdate`."""
    return RecordDict({"update": pack(update_arrays(update))})


def update_arrays(update: LocalUpdate) -> dict[str, torch.Tensor | np.ndarray]:
    """The fields of ``update`` as named arrays."""
    arrays: dict[str, torch.Tensor | np.ndarray] = {
        "users": update.users.astype(np.int64),
        "row_client": update.row_client.astype(np.int64),
        "row_item": update.row_item.astype(np.int64),
        "num_samples": update.num_samples.astype(np.int64),
        "loss": update.loss.astype(np.float64),
    }
    arrays.update({f"shared/{n}": t for n, t in update.shared.items()})
    arrays.update({f"rows/{n}": t for n, t in update.rows.items()})
    arrays.update({f"decay/{n}": t for n, t in update.decay.items()})
    arrays.update({f"metric/{k}": np.asarray(v, np.float64) for k, v in update.metrics.items()})
    if update.signatures is not None:
        arrays["signatures"] = update.signatures
    return arrays


def decode_update(content: RecordDict) -> LocalUpdate:
    return update_from_arrays(unpack(content.array_records["update"]))


def update_from_arrays(a: dict[str, torch.Tensor]) -> LocalUpdate:
    """Inverse of :func:`update_arrays`."""

    def part(kind: str) -> dict[str, torch.Tensor]:
        return {k.split("/", 1)[1]: v for k, v in a.items() if k.startswith(kind + "/")}

    return LocalUpdate(
        users=a["users"].numpy(),
        shared=part("shared"),
        rows=part("rows"),
        row_client=a["row_client"].numpy(),
        row_item=a["row_item"].numpy(),
        decay=part("decay"),
        num_samples=a["num_samples"].numpy(),
        loss=a["loss"].numpy(),
        signatures=a.get("signatures"),
        metrics={k: v.numpy() for k, v in part("metric").items()},
    )


def encode_signatures(update: LocalUpdate) -> RecordDict:
    """A node's reply to a grouping round's first step under secure aggregation: its kept clients and
    their head signatures (as they leave the clients: clipped and noised under ``privacy.signature_noise``)."""
    signatures = update.signatures if update.signatures is not None else torch.zeros(len(update.users), 0)
    return RecordDict({"signatures": pack({"users": update.users.astype(np.int64), "signatures": signatures})})


def decode_signatures(content: RecordDict) -> tuple[np.ndarray, torch.Tensor]:
    a = unpack(content.array_records["signatures"])
    return a["users"].numpy(), a["signatures"]


def encode_groups(content: RecordDict, users: np.ndarray, labels: np.ndarray, groups: int) -> RecordDict:
    """``content`` (a training message) with the group of each of a node's clients in a grouping round."""
    content["groups"] = pack({"users": np.asarray(users, np.int64), "labels": np.asarray(labels, np.int64)})
    content["grouping"] = ConfigRecord({"groups": groups})
    return content


def decode_groups(content: RecordDict) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(clients, their groups, how many groups) of a grouping round's message (None in other rounds)."""
    if "groups" not in content.array_records:
        return None
    a = unpack(content.array_records["groups"])
    return a["users"].numpy(), a["labels"].numpy(), int(scalar(content.config_records["grouping"], "groups"))


def encode_sums(update: LocalUpdate, shared: Params, weighted: bool, dense: bool, rejected: int = 0) -> RecordDict:
    """A node's clients folded into one partial FedAvg aggregate (what it sends when no plug-in needs
    per-client uploads this round): the weighted sums of their shared parameters, their total weight,
    and the sums of their losses and figures. The server sees no single client's upload.

    An item table's sum is sent for the rows some client trained, with the weighted sum of the clients'
    decay factors: every other row's sum is that times the broadcast row, which the server has (with
    ``dense``, every row is sent and no item id).
    """

    agg = FedAvg(weighted)
    agg.add(update, shared)
    w = agg.client_weights(update)
    arrays: dict[str, torch.Tensor | np.ndarray] = {}
    for name, value in agg.sums.items():
        if name in agg.trained_rows:
            rows = torch.arange(len(value)) if dense else torch.nonzero(agg.trained_rows[name]).flatten()
            arrays[f"sum/{name}"], arrays[f"rows/{name}"] = value.index_select(0, rows), rows
            arrays[f"decaysum/{name}"] = (w @ update.decay[name].to(torch.float32)).reshape(1)
        else:
            arrays[f"sum/{name}"] = value
    arrays["totals"] = np.array([agg.total, float(update.loss.sum()), len(update.users), rejected], np.float64)
    arrays.update({f"metric/{k}": np.array([float(v.sum())]) for k, v in update.metrics.items()})
    return RecordDict({"sums": pack(arrays)})


def decode_sums(
    content: RecordDict, shared: Params
) -> tuple[Params, float, dict[str, torch.Tensor], float, int, dict[str, float], int]:
    """(sums, total weight, trained rows, loss sum, clients, figure sums, uploads the node rejected) of
    :func:`encode_sums`;
    ``shared`` are the parameters the node's clients started from."""
    a = unpack(content.array_records["sums"])
    total, loss, clients, rejected = a["totals"].tolist()

    def part(kind: str) -> dict[str, torch.Tensor]:
        return {k.split("/", 1)[1]: v for k, v in a.items() if k.startswith(kind + "/")}

    sums, trained = part("sum"), {}
    for name, rows in part("rows").items():
        full = shared[name] * a[f"decaysum/{name}"].to(shared[name].dtype)
        full.index_copy_(0, rows, sums[name])
        sums[name] = full
        trained[name] = torch.zeros(len(full), dtype=torch.bool).index_fill_(0, rows, True)
    return sums, total, trained, loss, int(clients), {k: float(v) for k, v in part("metric").items()}, int(rejected)
