"""Median seconds of a batched training round on ML-100K, for A/B comparisons between commits.

The engine benchmark's setting (943 clients, 5 local epochs, 4 negatives, batch 256, d = 64); no naive loop
and no evaluation, so one model takes seconds. On a noisy machine, alternate the two versions:

    for i in 1 2 3; do for tree in ../old ../new; do
        PYTHONPATH=$tree/src python benchmarks/round_seconds.py --model fedrap; done; done
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fcf")
    parser.add_argument("--rounds", type=int, default=4, help="rounds run; the median is over all but the first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import gfmfr
    from gfmfr.config import from_dict
    from gfmfr.data.dataset import load_dataset
    from gfmfr.federation.engine import Federation
    from gfmfr.models import build_model

    cfg = from_dict(
        {
            "model": {"name": args.model, "dim": 64},
            "federation": {"local_epochs": 5, "num_negatives": 4, "batch_size": 256},
        }
    )
    data = load_dataset(cfg.data)
    fed = Federation(data, build_model(data.n_items, cfg.model), cfg)
    times = []
    for t in range(args.rounds):
        t0 = time.perf_counter()
        fed.train_round(t)
        times.append(time.perf_counter() - t0)
    median = float(np.median(times[1:] if len(times) > 1 else times))
    sys.stdout.write(f"{args.model} {median:.3f} s/round (median of rounds 1-{args.rounds - 1}; {gfmfr.__file__})\n")


if __name__ == "__main__":
    main()
