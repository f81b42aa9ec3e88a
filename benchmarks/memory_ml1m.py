"""Peak RSS of FedRAP rounds at ML-1M size: 6,040 clients x 3,706 items, d = 64 (synthetic).

The interactions are synthetic with ML-1M's shape (about 1,000,209 positives, at least 20 per
user, long-tailed item popularity), so the figure needs no download. Clients train in
chunks of ``runtime.client_chunk``; private D_u rows are stored only where trained.

    python benchmarks/memory_ml1m.py [--rounds 2] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np
import pandas as pd


def synthetic_ml1m(seed: int = 0, n_users: int = 6040, n_items: int = 3706, total: int = 1_000_209) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = np.maximum(20, rng.lognormal(np.log(96), 1.0, n_users)).astype(int)
    sizes = np.minimum(np.round(sizes * total / sizes.sum()).astype(int), n_items // 2)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.9
    pop /= pop.sum()
    users, items = [], []
    for u, k in enumerate(sizes):
        chosen = rng.choice(n_items, size=max(k, 20), replace=False, p=pop)
        users.append(np.full(len(chosen), u))
        items.append(chosen)
    users, items = np.concatenate(users), np.concatenate(items)
    return pd.DataFrame(
        {
            "user_id": users.astype(str),
            "item_id": items.astype(str),
            "rating": 4.0,
            "timestamp": rng.permutation(len(users)).astype(float),
            "line": np.arange(2, len(users) + 2),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from gfmfr.config import DataConfig, from_dict
    from gfmfr.data.dataset import build_dataset
    from gfmfr.data.sources import RawData
    from gfmfr.federation.engine import Federation
    from gfmfr.models import build_model
    from gfmfr.results import peak_rss_mb

    data = build_dataset(RawData(synthetic_ml1m(), "synthetic-ml1m"), DataConfig(), "synthetic-ml1m")
    cfg = from_dict({"model": {"name": "fedrap", "dim": 64}, "runtime": {"client_chunk": args.chunk}})
    fed = Federation(data, build_model(data.n_items, cfg.model), cfg)
    sys.stdout.write(
        f"{data.n_users} clients x {data.n_items} items, {len(data.train_items)} training positives; "
        f"rss before training {peak_rss_mb():.0f} MB\n"
    )
    rows = []
    for t in range(args.rounds):
        t0 = time.perf_counter()
        fed.train_round(t)
        rows.append(
            {
                "round": t,
                "seconds": time.perf_counter() - t0,
                "peak_rss_mb": peak_rss_mb(),
                "private_state_mb": fed.state.private_nbytes() / 2**20,
            }
        )
        sys.stdout.write(json.dumps(rows[-1]) + "\n")
    dense_d = data.n_users * data.n_items * cfg.model.dim * 4 / 2**20
    sys.stdout.write(
        f"peak RSS {peak_rss_mb():.0f} MB (target 8192); dense D_u for all clients would be {dense_d:.0f} MB\n"
    )


if __name__ == "__main__":
    main()
