"""Seconds per round of X and GFMFR-X, phase by phase, in one process (ML-100K, shared content).

For each model, runs a few rounds of the base model and of GFMFR on it (each ``--variant``'s
overrides on top of the defaults) in lockstep, round by round, validating every round as ``gfmfr
run`` does, and prints the mean seconds of every phase over the rounds after the first: client
training, aggregation, GFMFR's grouping, group targets, fusion and teacher, and validation. The last
column is GFMFR-X's total over X's, measured in the same run (the machine is noisy: compare ratios,
not seconds). With ``--target`` it instead advances them, in lockstep, until each first reaches that
validation NDCG@10, and prints the rounds and the wall seconds this took (building included) and
their ratio to X's: time to quality measured side by side.

    python benchmarks/gfmfr_server_cost.py --models fcf --seed 0 --target 0.0608 --variant gfmfr \
        --variant client gfmfr.teacher_level=client
    python benchmarks/gfmfr_server_cost.py --models fcf fedrap --threads 1 \
        --variant gfmfr --variant every1 gfmfr.server_every=1 --variant mmx plugin=none wrapper=mmx
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

PHASES = ("train", "aggregate", "grouping", "group_targets", "fusion", "teacher", "evaluate")


def build(dataset, cfgs: list) -> tuple[list, list[float]]:
    """A federation per configuration, and the seconds building each took (GFMFR's content reduction
    included)."""
    from gfmfr.build import build_run_model
    from gfmfr.federation.engine import Federation

    feds, seconds = [], []
    for cfg in cfgs:
        t0 = time.perf_counter()
        model, plugins = build_run_model(dataset, cfg)
        feds.append(Federation(dataset, model, cfg, plugins))
        seconds.append(time.perf_counter() - t0)
    return feds, seconds


def measure(dataset, cfgs: list, rounds: int) -> list[dict[str, float]]:
    """Mean seconds per phase over rounds 1..rounds-1 of each configuration (a phase a round skipped
    counts as 0: a phase run every k rounds costs 1/k of itself a round).

    The federations advance in lockstep, round t of each before round t + 1 of any, so that a slow
    spell of a shared machine falls on every method alike and the ratios stay comparable."""
    feds, _ = build(dataset, cfgs)
    per_round: list[list[dict[str, float]]] = [[] for _ in feds]
    for t in range(rounds):
        for fed, log in zip(feds, per_round):
            entry = fed.train_round(t)
            t0 = time.perf_counter()
            fed.evaluator.evaluate(fed.score, "valid")
            entry.seconds["evaluate"] = time.perf_counter() - t0
            log.append(entry.seconds)
    out = []
    for log in per_round:
        keep = log[1:] if rounds > 1 else log
        out.append({p: float(np.mean([s.get(p, 0.0) for s in keep])) for p in PHASES})
    return out


def to_target(dataset, cfgs: list, target: float, max_rounds: int) -> list[tuple[int | None, float]]:
    """(rounds, wall seconds) until validation NDCG@10 first reaches ``target``, per configuration; the
    seconds count building the federation (GFMFR's content reduction included), every round's phases
    and its validation. The federations advance in lockstep as in :func:`measure`; one that has
    reached the target (or ``max_rounds``: None rounds) stops."""
    feds, spent = build(dataset, cfgs)
    reached: list[int | None] = [None] * len(feds)
    for t in range(max_rounds):
        for k, fed in enumerate(feds):
            if reached[k] is not None:
                continue
            t0 = time.perf_counter()
            fed.train_round(t)
            if fed.evaluator.evaluate(fed.score, "valid")["NDCG@10"] >= target:
                reached[k] = t + 1
            spent[k] += time.perf_counter() - t0
        if all(r is not None for r in reached):
            break
    return list(zip(reached, spent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcf", "fedrap"])
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar="LABEL [KEY=VALUE ...]",
        help="a label and GFMFR-run overrides; repeatable (default: the defaults)",
    )
    parser.add_argument("--rounds", type=int, default=11, help="rounds per run; the mean is over all but the first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--content", default="../shared/datasets/ml-100k-content")
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="instead of seconds per phase: rounds and wall seconds until validation NDCG@10 "
        "first reaches this (90%% of centralised FCF's: time_to_quality.py prints it)",
    )
    parser.add_argument("--max-rounds", type=int, default=400, help="with --target: give up after these rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from gfmfr.config import apply_overrides, from_dict
    from gfmfr.data.dataset import load_dataset
    from gfmfr.runtime import use_threads

    use_threads(args.threads)
    variants = args.variant or [["gfmfr"]]
    if args.target is not None:
        sys.stdout.write(f"time to validation NDCG@10 {args.target}, {args.threads} thread(s)\n\n")
        sys.stdout.write("| method | seed | rounds | wall seconds | / base |\n|---|---|---|---|---|\n")
    else:
        sys.stdout.write(f"mean seconds per round over rounds 1-{args.rounds - 1}, {args.threads} thread(s)\n\n")
        sys.stdout.write("| method | " + " | ".join(PHASES) + " | total | / base |\n")
        sys.stdout.write("|---|" + "---|" * (len(PHASES) + 2) + "\n")
    dataset = None
    for name in args.models:
        # a variant runs GFMFR unless its overrides say otherwise (plugin=none wrapper=mmx, say)
        runs = [["base", "plugin=none"], *[[v[0], "plugin=gfmfr", *v[1:]] for v in variants]]
        cfgs = [
            from_dict(
                apply_overrides({"model": {"name": name}, "data": {"content": args.content}, "seed": args.seed}, sets)
            )
            for _, *sets in runs
        ]
        if dataset is None:
            dataset = load_dataset(cfgs[0].data)
        if args.target is not None:
            reached = to_target(dataset, cfgs, args.target, args.max_rounds)
            base_s = reached[0][1]
            for (label, *_), (rounds, secs) in zip(runs, reached):
                sys.stdout.write(
                    f"| {name} {label} | {args.seed} | {rounds or 'never'} | {secs:.1f} | {secs / base_s:.2f} |\n"
                )
            sys.stdout.flush()
            continue
        measured = measure(dataset, cfgs, args.rounds)
        base = sum(measured[0].values())
        for (label, *_), secs in zip(runs, measured):
            total = sum(secs.values())
            sys.stdout.write(
                f"| {name} {label} | "
                + " | ".join(f"{secs[p]:.3f}" for p in PHASES)
                + f" | {total:.3f} | {total / base:.2f} |\n"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
