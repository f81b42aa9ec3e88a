"""Flower at scale: a synthetic federation of 10K users on 8 simulated nodes against in-process.

The federation is :func:`gfmfr.data.synthetic.synthetic_dataset` (real data's shape: lognormal
activity, Zipf popularity; 10,000 users over about 5,000 items), written as a folder in the published
layout (``inter.csv`` with ``split_label``, ``text_features.npy``) so that every Flower node reads its
own users from it, as deployed nodes would. Each model (FCF and GFMFR-FCF by default) runs
``--rounds`` rounds, every client every round, validation after the last only:

- ``in-process``: the batched engine;
- ``flower-N``: Flower's simulation engine (Ray), N nodes of one CPU each (on this machine's cores).

It prints seconds per round (train + aggregate + server work, mean over rounds 1 .. R-1; round 0
starts the nodes), the bytes of tensors a client receives and sends per round over Flower (the
nodes' messages over the round's clients), and the largest difference of the last round's
validation metrics from the in-process run's.

    python benchmarks/flower_scale.py [--users 10000] [--nodes 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from gfmfr.config import from_dict
from gfmfr.data.synthetic import synthetic_dataset
from gfmfr.run import run

log = logging.getLogger("flower_scale")


def write_folder(users: int, path: Path) -> None:
    """The synthetic federation in the published layout (0 train, 1 validation, 2 test)."""
    data = synthetic_dataset(users)
    counts = np.diff(data.train_indptr)
    rows = []
    for split, (u, i) in enumerate(
        [
            (np.repeat(np.arange(data.n_users), counts), data.train_items),
            (np.arange(data.n_users), data.valid_items),
            (np.arange(data.n_users), data.test_items),
        ]
    ):
        rows.append(pd.DataFrame({"userID": u, "itemID": i, "rating": 1, "split_label": split}))
    frame = pd.concat(rows, ignore_index=True)
    frame["timestamp"] = np.arange(len(frame))  # train, then validation, then test: by time too
    frame.to_csv(path / "inter.csv", index=False)
    np.save(path / "text_features.npy", data.item_features["text"])


def round_seconds(result: dict) -> float:
    history = result["history"][1:]
    skip = ("evaluate", "validate", "test")
    return float(np.mean([sum(v for k, v in h["seconds"].items() if k not in skip) for h in history]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=10000)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plugins", nargs="+", default=["none", "gfmfr"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"synthetic-{args.users}"
        folder.mkdir()
        write_folder(args.users, folder)
        for plugin in args.plugins:
            base = {
                "data": {"dataset": str(folder)},
                "model": {"name": "fcf"},
                "plugin": plugin,
                "federation": {"rounds": args.rounds, "early_stop_patience": 0, "eval_every": args.rounds},
                "runtime": {"threads": 1, "save_model": False},
            }
            t0 = time.perf_counter()
            inprocess = run(from_dict(base))
            log.warning("%s in-process: %.0f s", plugin, time.perf_counter() - t0)
            flower_cfg = from_dict({**base, "runtime": {**base["runtime"], "backend": "flower", "nodes": args.nodes}})
            t0 = time.perf_counter()
            flower = run(flower_cfg)
            log.warning("%s flower: %.0f s", plugin, time.perf_counter() - t0)
            a, b = inprocess["history"][-1]["valid"], flower["history"][-1]["valid"]
            diff = max(abs(a[k] - b[k]) for k in a)
            wire = flower["flower"]["wire_bytes_per_client"]
            name = "GFMFR-FCF" if plugin == "gfmfr" else "FCF"
            rows.append((name, round_seconds(inprocess), round_seconds(flower), wire["down"], wire["up"], diff))

    print(f"\nFlower at scale: {args.users} synthetic users, {args.nodes} simulated nodes, {args.rounds} rounds")
    print(
        f"| model | in-process s/round | flower-{args.nodes} s/round | ratio | KB down/client | KB up/client "
        "| max abs valid diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, local, flower, down, up, diff in rows:
        print(
            f"| {name} | {local:.2f} | {flower:.2f} | {flower / local:.1f}x | {down / 1e3:.1f} | {up / 1e3:.1f} "
            f"| {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
