"""Rounds and wall seconds until validation NDCG@10 first reaches 90% of centralised FCF's.

Each (model, variant, seed) is one ``gfmfr run`` in a subprocess with one thread (``--jobs`` at
a time; a finished run in ``--out`` is reused). The target is 90% of the validation NDCG@10 of
centralised FCF with the same seed (run once, in ``--out``). Seconds are the run's own wall
time per round, training, server work and validation included, summed until the round that
first reaches the target; "never" when the run stopped (budget or early stopping) before.

``--from-report DIR`` runs nothing: it reads the runs of a ``gfmfr compare`` report instead
(``DIR/runs/<method>/seed<k>/results.json``, the bound from ``DIR/runs/fcf-centralised``).

A variant is a label and overrides, ``plugin=...`` choosing the plug-in:

    python benchmarks/time_to_quality.py --models fcf fedrap --seeds 0 \
        --variant fedavg --variant fedadam federation.server_optimizer=fedadam federation.server_lr=0.01 \
        --variant gfmfr plugin=gfmfr --content ../shared/datasets/ml-100k-content --out runs/ttq
"""

from __future__ import annotations

import argparse
import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from runner import first_reach, run_point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcf", "pfedrec", "fedncf", "fedrap"])
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar="LABEL [KEY=VALUE ...]",
        help="a label and its overrides (plugin=NAME picks the plug-in); repeatable",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    parser.add_argument("--content", default=None, help="content folder (needed by plug-ins)")
    parser.add_argument("--fraction", type=float, default=0.9, help="share of the centralised bound to reach")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/ttq")
    parser.add_argument("--from-report", help="read the runs of a gfmfr compare report instead of running")
    args = parser.parse_args()
    if args.from_report:
        from_report(Path(args.from_report), args.fraction)
        return
    out = Path(args.out)
    variants = args.variant or [["defaults"]]
    with ThreadPoolExecutor(args.jobs) as pool:
        bounds = dict(
            zip(
                args.seeds,
                pool.map(
                    lambda s: run_point(out / f"centralised_fcf_s{s}", "fcf", ["training=centralised"], s), args.seeds
                ),
            )
        )
        grid = list(itertools.product(args.models, variants, args.seeds))

        def one(g):
            model, (label, *sets), seed = g
            plugin = next((s.split("=", 1)[1] for s in sets if s.startswith("plugin=")), "none")
            sets = [s for s in sets if not s.startswith("plugin=")] + args.set
            return run_point(out / f"{model}_{label}_s{seed}", model, sets, seed, plugin, args.content)

        results = list(pool.map(one, grid))
    sys.stdout.write(
        f"target: {args.fraction:.0%} of centralised FCF's validation NDCG@10 "
        + ", ".join(f"seed {s}: {args.fraction * b['valid']['NDCG@10']:.4f}" for s, b in bounds.items())
        + "\n\n"
    )
    sys.stdout.write(
        "| model | variant | seed | rounds to target | seconds to target | rounds run | best valid | test at best "
        "| s/round (all phases) |\n"
    )
    sys.stdout.write("|---|---|---|---|---|---|---|---|---|\n")
    for (model, (label, *_), seed), res in zip(grid, results):
        if "error" in res:
            sys.stdout.write(f"| {model} | {label} | {seed} | failed: {res['error']} |||||\n")
            continue
        reach = first_reach(res, args.fraction * bounds[seed]["valid"]["NDCG@10"])
        hist = res["history"]
        per_round = float(np.mean([sum(h["seconds"].values()) for h in hist]))
        cells = f"{reach[0]} | {reach[1]:.1f}" if reach else "never | never"
        sys.stdout.write(
            f"| {model} | {label} | {seed} | {cells} | {len(hist)} | {res['valid']['NDCG@10']:.4f} | "
            f"{res['test']['NDCG@10']:.4f} | {per_round:.2f} |\n"
        )


def from_report(report: Path, fraction: float) -> None:
    """The table over every federated method of a compare report, one row per method (seed mean)."""
    import json

    def load(folder: Path) -> dict[int, dict]:
        return {int(p.parent.name[4:]): json.loads(p.read_text()) for p in sorted(folder.glob("seed*/results.json"))}

    bounds = load(report / "runs" / "fcf-centralised")
    sys.stdout.write(
        f"target: {fraction:.0%} of centralised FCF's validation NDCG@10 per seed "
        + ", ".join(f"{s}: {fraction * b['valid']['NDCG@10']:.4f}" for s, b in bounds.items())
        + "\n\n"
    )
    sys.stdout.write("| method | seeds | reached | rounds to target | seconds to target | s/round (all phases) |\n")
    sys.stdout.write("|---|---|---|---|---|---|\n")
    for folder in sorted((report / "runs").iterdir()):
        runs = load(folder)
        if not runs or folder.name in ("fcf-centralised", "popularity", "random") or "centralised" in folder.name:
            continue
        reach = [first_reach(r, fraction * bounds[s]["valid"]["NDCG@10"]) for s, r in runs.items() if s in bounds]
        hit = [x for x in reach if x]
        per_round = np.mean([np.mean([sum(h["seconds"].values()) for h in r["history"]]) for r in runs.values()])
        cells = f"{np.mean([x[0] for x in hit]):.0f} | {np.mean([x[1] for x in hit]):.0f}" if hit else "never | never"
        sys.stdout.write(f"| {folder.name} | {len(runs)} | {len(hit)}/{len(reach)} | {cells} | {per_round:.2f} |\n")


if __name__ == "__main__":
    main()
