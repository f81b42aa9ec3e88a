"""Seconds per round, peak RSS, batched-vs-naive ratio and evaluation speed on ML-100K.

Setting: 943 clients, 5 local epochs, 4 negatives, batch 256, d = 64.
The naive round trains one client after another with the one-client step (plain dense PyTorch:
full item-table copies, autograd, torch.optim.SGD, as the reference code trains; what a device
runs); the "1-by-1" round calls the batched engine with one client at a time; the batched round
trains all clients at once. All three compute the same parameters.
Each model runs in its own subprocess so that its peak RSS is its own.

    python benchmarks/engine_speed.py [--models fcf fedrap] [--rounds 3] [--naive-clients 943]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time

import numpy as np


def measure(model_name: str, rounds: int, naive_clients: int) -> dict:
    from gfmfr.config import from_dict
    from gfmfr.data.dataset import load_dataset
    from gfmfr.federation.aggregation import FedAvg
    from gfmfr.federation.batched import train_clients
    from gfmfr.federation.engine import Federation
    from gfmfr.models import build_model
    from gfmfr.results import peak_rss_mb

    cfg = from_dict(
        {
            "model": {"name": model_name, "dim": 64},
            "federation": {"local_epochs": 5, "num_negatives": 4, "batch_size": 256},
        }
    )
    data = load_dataset(cfg.data)
    fed = Federation(data, build_model(data.n_items, cfg.model), cfg)
    times = []
    for t in range(rounds):
        t0 = time.perf_counter()
        fed.train_round(t)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    fed.evaluator.evaluate(fed.state.score, "valid")
    eval_s = time.perf_counter() - t0

    # naive: the same round, one client after another, (a) the one-client step (dense PyTorch),
    # (b) the batched engine called with one client at a time
    # a seeded random sample of clients (the first clients of ML-100K are heavier than average)
    users = np.arange(data.n_users)
    if naive_clients < data.n_users:
        users = np.sort(np.random.default_rng(0).choice(data.n_users, size=naive_clients, replace=False))
    scale = data.n_users / len(users)
    t0 = time.perf_counter()
    fed.train_one_by_one(users, rounds)
    naive = (time.perf_counter() - t0) * scale
    agg = FedAvg()
    t0 = time.perf_counter()
    for u in users:
        agg.add(
            train_clients(
                fed.model, fed.state, np.array([u]), data, cfg.federation, cfg.seed, rounds, train_keys=fed.train_keys
            ),
            fed.state.shared,
        )
    agg.result(fed.state.shared)
    single = (time.perf_counter() - t0) * scale
    batched = float(np.median(times[1:] if len(times) > 1 else times))
    return {
        "model": model_name,
        "seconds_per_round": batched,
        "round_seconds": times,
        "naive_seconds_per_round": naive,
        "naive_clients_timed": len(users),
        "speedup": naive / batched,
        "one_at_a_time_seconds_per_round": single,
        "speedup_vs_one_at_a_time": single / batched,
        "eval_seconds_all_users": eval_s,
        "eval_scores_per_second": data.n_users * data.n_items / eval_s,
        "peak_rss_mb": peak_rss_mb(),
        "private_state_mb": fed.state.private_nbytes() / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcf", "fedncf", "pfedrec", "fedrap"])
    parser.add_argument("--rounds", type=int, default=3, help="batched rounds timed (median of rounds after the first)")
    parser.add_argument(
        "--naive-clients",
        type=int,
        default=943,
        help="clients timed in the naive loops (a seeded random sample, scaled up)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        sys.stdout.write(json.dumps(measure(args.one, args.rounds, args.naive_clients)) + "\n")
        return
    rows = []
    for name in args.models:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                name,
                "--rounds",
                str(args.rounds),
                "--naive-clients",
                str(args.naive_clients),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = (
        f"{'model':<9}{'s/round':>9}{'naive s':>9}{'ratio':>8}{'1-by-1 s':>10}{'ratio':>8}"
        f"{'eval s':>8}{'Mscores/s':>11}{'peak MB':>9}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['model']:<9}{r['seconds_per_round']:>9.2f}{r['naive_seconds_per_round']:>9.1f}{r['speedup']:>7.1f}x"
            f"{r['one_at_a_time_seconds_per_round']:>10.1f}{r['speedup_vs_one_at_a_time']:>7.1f}x"
            f"{r['eval_seconds_all_users']:>8.2f}{r['eval_scores_per_second'] / 1e6:>11.1f}{r['peak_rss_mb']:>9.0f}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.write(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
