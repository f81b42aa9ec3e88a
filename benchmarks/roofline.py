"""Where a round's time goes, against what the machine allows: each phase's measured seconds over its bound.

For each model (with and without GFMFR) on ML-100K (and Amazon Scientific if ``../shared`` has it), at
the defaults (one local epoch, every client, d = 64, 4 negatives, batch 256), the script counts a round's
work from its shapes and measures the machine's own rates in the same run:

- **train**: every scored (client, item) pair costs a dot product forward, two gradient products
  backward and an SGD update of its two rows: 9d FLOPs, and its item row read, then written back (8d
  bytes). Pairs are the round's positives times (1 + negatives), per local epoch.
- **aggregate**: the uploaded rows (counted as the engine folds them in) are read once and added to a
  sum table (read and written): 12d bytes and 2d FLOPs per row.
- **evaluate**: every user scored against every item (a matrix product, 2d FLOPs per score) and its
  scores read once by the top-K.

A phase's bound is max(FLOPs / matmul rate, bytes / copy rate), with the rates measured here (a large
float32 matrix product; a large tensor copy) on the same threads. A ratio of 1 is the machine's limit;
GFMFR's server phases (grouping, fusion, teacher) are reported as measured, with the per-round cost of
GFMFR against its base model.

    python benchmarks/roofline.py [--models fcf pfedrec] [--rounds 6] [--threads 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runner import uploads

AMAZON = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "amazon-scientific"


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """float32 matrix-product FLOP/s (the best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def copy_rate(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read plus write; the best of ``repeats``)."""
    src = torch.randn(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(dataset_name: str, model: str, plugin: str, rounds: int, flops: float, bandwidth: float) -> list[dict]:
    """One row per phase of ``model`` (+ ``plugin``) on ``dataset_name``: work, bound and measured seconds."""
    from gfmfr.build import build_run_model
    from gfmfr.config import from_dict
    from gfmfr.data.dataset import load_dataset
    from gfmfr.federation.engine import Federation

    cfg = from_dict({"data": {"dataset": dataset_name}, "model": {"name": model}, "plugin": plugin})
    data = load_dataset(cfg.data)
    net, plugins = build_run_model(data, cfg)
    fed = Federation(data, net, cfg, plugins)
    with uploads() as seen:
        logs = []
        for t in range(rounds):
            seen.clear()
            entry = fed.train_round(t)
            t0 = time.perf_counter()
            fed.evaluate("valid")
            entry.seconds["evaluate"] = time.perf_counter() - t0
            logs.append((entry, sum(u.rows for u in seen)))
    logs = logs[1:] if len(logs) > 1 else logs  # the first round warms caches up
    d, fc = cfg.model.dim, cfg.federation
    pairs = len(data.train_items) * (1 + fc.num_negatives) * fc.local_epochs
    rows = float(np.mean([r for _, r in logs]))
    scored = data.n_users * data.n_items
    work = {
        "train": (9 * d * pairs, 8 * d * 4 * pairs),
        "aggregate": (2 * d * rows, 12 * d * rows),
        "evaluate": (2 * d * scored, 4 * scored + 4 * d * (data.n_users + data.n_items)),
    }
    out = []
    phases = sorted({k for entry, _ in logs for k in entry.seconds}, key=lambda k: (k not in work, k))
    for phase in phases:
        seconds = float(np.mean([entry.seconds.get(phase, 0.0) for entry, _ in logs]))
        flop, byte = work.get(phase, (None, None))
        bound = max(flop / flops, byte / bandwidth) if flop is not None else None
        out.append({"phase": phase, "gflop": flop, "gb": byte, "bound": bound, "seconds": seconds})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcf", "pfedrec"])
    parser.add_argument("--rounds", type=int, default=6, help="rounds run; phases are the mean over all but the first")
    parser.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0: one per core)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from gfmfr.runtime import use_threads

    threads = use_threads(args.threads)
    flops, bandwidth = matmul_rate(), copy_rate()
    out = sys.stdout
    out.write(
        f"Machine, {threads} thread(s): matmul {flops / 1e9:.1f} GFLOP/s, copy {bandwidth / 1e9:.1f} GB/s "
        "(measured in this run).\n\n"
    )
    datasets = ["ml-100k"] + ([str(AMAZON)] if AMAZON.exists() else [])
    for dataset in datasets:
        name = "ML-100K" if dataset == "ml-100k" else "Amazon Scientific"
        out.write(f"## {name}\n\n| model | phase | GFLOP | GB moved | bound ms | measured ms | measured / bound |\n")
        out.write("|---|---|---|---|---|---|---|\n")
        totals = {}
        for model in args.models:
            for plugin in ("none", "gfmfr"):
                label = model.upper() if plugin == "none" else f"GFMFR-{model.upper()}"
                rows = measure(dataset, model, plugin, args.rounds, flops, bandwidth)
                for r in rows:
                    bound = f"{r['bound'] * 1e3:.1f}" if r["bound"] is not None else "-"
                    ratio = f"{r['seconds'] / r['bound']:.1f}x" if r["bound"] else "-"
                    gflop = f"{r['gflop'] / 1e9:.3f}" if r["gflop"] is not None else "-"
                    gb = f"{r['gb'] / 1e9:.3f}" if r["gb"] is not None else "-"
                    out.write(
                        f"| {label} | {r['phase']} | {gflop} | {gb} | {bound} | {r['seconds'] * 1e3:.1f} | {ratio} |\n"
                    )
                round_s = sum(r["seconds"] for r in rows if r["phase"] != "evaluate")
                bound_s = sum(r["bound"] for r in rows if r["bound"] is not None and r["phase"] != "evaluate")
                totals[(model, plugin)] = round_s
                out.write(
                    f"| {label} | **round (train + aggregate + server)** | | | {bound_s * 1e3:.1f} "
                    f"| {round_s * 1e3:.1f} | {round_s / bound_s:.1f}x |\n"
                )
                out.flush()
        out.write("\nGFMFR's cost per round against its base model: ")
        out.write(
            ", ".join(f"{m.upper()} {totals[(m, 'gfmfr')] / totals[(m, 'none')]:.2f}x" for m in args.models) + "\n\n"
        )


if __name__ == "__main__":
    main()
