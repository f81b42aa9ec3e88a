"""What secure aggregation costs: bytes and seconds per round with SecAgg+ against without (ML-100K).

Each row runs FCF (or ``--model``) through the ServerApp and ClientApp code on N nodes of a
:class:`gfmfr.flower.local.LocalGrid` (Flower's messages, records, SecAgg+ workflow and mod, with no
Ray and no network), ``--rounds`` rounds with validation only after the last:

- ``plain``: each node sends its clients' partial aggregate (the rows they trained);
- ``SecAgg+, K neighbours``: ``privacy.secure_aggregation`` with ``privacy.secagg_neighbours = K``
  (every node shares its secrets with K of the round's nodes, all of them when fewer).

Every node runs in this one process, one after another, so a round's seconds are the whole
federation's compute: the server's and every node's (a real node does its part in parallel with the
others; divide by the nodes for one node's). Seconds are train + aggregate, mean over rounds 1 .. R-1
(round 0 builds the nodes). Bytes are every message's tensors and byte strings (keys, encrypted
shares, masked vectors) each way, per round. ``max |valid diff|`` is the largest difference of the last
round's validation metrics from the plain run's (the quantisation's effect).

    python benchmarks/secagg_cost.py [--nodes 10 100] [--neighbours 100 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from gfmfr.config import from_dict
from gfmfr.flower import client_app, server_app
from gfmfr.flower.local import LocalGrid

log = logging.getLogger("secagg_cost")


def one_run(model: str, nodes: int, rounds: int, neighbours: int | None) -> dict:
    from flwr.app import Context, RecordDict

    from gfmfr.config import to_toml

    values: dict = {
        "model": {"name": model},
        "federation": {"rounds": rounds, "early_stop_patience": 0, "eval_every": rounds},
        "runtime": {"threads": 1, "save_model": False},
    }
    if neighbours is not None:
        values["privacy"] = {"secure_aggregation": True, "secagg_neighbours": neighbours}
    cfg = from_dict(values)
    client_app._NODES.clear()
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        grid = LocalGrid(client_app.make_client_app({"config": to_toml(cfg)}), nodes, {"state-dir": str(Path(tmp))})
        t0 = time.perf_counter()
        server_app.main(grid, Context(1, 0, {}, RecordDict(), {}), {"config": to_toml(cfg)}, None, result)
        result["wall"] = time.perf_counter() - t0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fcf")
    ap.add_argument("--nodes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--neighbours", type=int, nargs="+", default=[100, 16])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    rows = []
    for nodes in args.nodes:
        plain = None
        counts = dict.fromkeys(min(k, nodes) for k in args.neighbours)  # more than the nodes: all of them
        for neighbours in [None, *counts]:
            r = one_run(args.model, nodes, args.rounds, neighbours)
            history = r["history"]
            seconds = np.mean(
                [sum(v for k, v in h["seconds"].items() if k in ("train", "aggregate")) for h in history[1:]]
            )
            per_client = r["flower"]["wire_bytes_per_client"]
            clients = history[-1]["clients"]
            down, up = per_client["down"] * clients, per_client["up"] * clients
            valid = history[-1]["valid"]
            if plain is None:
                plain = valid
            diff = max(abs(valid[k] - plain[k]) for k in plain)
            used = None if neighbours is None else (nodes if neighbours >= nodes else neighbours | 1)
            name = "plain" if used is None else f"SecAgg+, {used} neighbours"
            rows.append((nodes, name, seconds, down / 1e6, up / 1e6, diff))
            log.warning("%d nodes, %s: %.2f s/round", nodes, name, seconds)

    print(f"\nsecure aggregation cost: {args.model} on ML-100K, {args.rounds} rounds, every client every round")
    print("| nodes | aggregation | s/round (all nodes) | MB down/round | MB up/round | max abs valid diff |")
    print("|---|---|---|---|---|---|")
    for nodes, name, seconds, down, up, diff in rows:
        print(f"| {nodes} | {name} | {seconds:.2f} | {down:.1f} | {up:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
