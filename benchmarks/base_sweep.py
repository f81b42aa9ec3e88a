"""Learning-rate sweep of the federated base models, selected on validation only.

Each point is one ``gfmfr run`` (a subprocess, one thread) with one local epoch, a long round
budget and early stopping on validation NDCG@10; the learning rates are the model's defaults
times a factor for the user/head group (``lr``, and FedRAP's ``private_item_lr``) and a factor
for the shared item table (``item_lr``). Points run ``--jobs`` at a time, and a finished point
(its ``results.json`` exists) is read back instead of rerun. Prints one row per point and the
point with the best validation NDCG@10 per model; test is printed, never used to choose.

    python benchmarks/base_sweep.py --models fcf pfedrec --user-factors 1 3 --item-factors 1 3 10 --out runs/sweep
"""

from __future__ import annotations

import argparse
import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runner import run_point


def default_lrs(model: str, extra: list[str]) -> dict[str, float]:
    from gfmfr.config import apply_overrides, from_dict
    from gfmfr.models import FEDERATED_MODELS

    from_dict(apply_overrides({"model": {"name": model}}, extra))
    return dict(FEDERATED_MODELS[model].default_lrs)


def point(model: str, fu: float, fi: float, seed: int, extra: list[str], out: Path, report_only: bool = False) -> dict:
    lrs = default_lrs(model, extra)
    sets = [f"model.lr={lrs['lr'] * fu:g}", f"model.item_lr={lrs['item_lr'] * fi:g}"]
    if model == "fedrap":
        sets.append(f"model.private_item_lr={lrs['private_item_lr'] * fu:g}")
    name = f"{model}_u{fu:g}_i{fi:g}_s{seed}"
    head = {"name": name, "model": model, "fu": fu, "fi": fi, "seed": seed}
    if report_only and not (out / name / "results.json").exists():
        return {**head, "error": "not run"}
    res = run_point(out / name, model, sets + extra, seed)
    if "error" in res:
        return {**head, **res}
    hist = res["history"]
    return {
        **head,
        "best_round": res["best_round"],
        "rounds": len(hist),
        "valid": res["valid"]["NDCG@10"],
        "test": res["test"]["NDCG@10"],
        "test_hr50": res["test"]["HR@50"],
        "test_ndcg50": res["test"]["NDCG@50"],
        "s_per_round": res["seconds_per_round"],
        "eval_s": sum(h["seconds"].get("evaluate", 0) for h in hist) / len(hist),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcf", "pfedrec", "fedncf", "fedrap"])
    parser.add_argument("--user-factors", nargs="+", type=float, default=[1, 3])
    parser.add_argument("--item-factors", nargs="+", type=float, default=[1, 3, 10])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", action="append", default=[], help="extra override for every point")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--report-only", action="store_true", help="print the points already run, run nothing")
    args = parser.parse_args()
    out = Path(args.out)
    grid = list(itertools.product(args.models, args.user_factors, args.item_factors, args.seeds))
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda g: point(*g, args.set, out, args.report_only), grid))
    sys.stdout.write(
        "| model | lr x | item_lr x | seed | rounds | best round | valid NDCG@10 | test NDCG@10 | test HR@50 "
        "| test NDCG@50 | s/round | eval s |\n"
    )
    sys.stdout.write("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        if "error" in r:
            sys.stdout.write(f"| {r['model']} | {r['fu']:g} | {r['fi']:g} | {r['seed']} | failed: {r['error']} |\n")
            continue
        sys.stdout.write(
            f"| {r['model']} | {r['fu']:g} | {r['fi']:g} | {r['seed']} | {r['rounds']} | {r['best_round']} "
            f"| {r['valid']:.4f} | {r['test']:.4f} | {r['test_hr50']:.3f} | {r['test_ndcg50']:.4f} "
            f"| {r['s_per_round']:.2f} | {r['eval_s']:.2f} |\n"
        )
    for model in args.models:
        ok = [r for r in rows if r["model"] == model and "error" not in r]
        if ok:
            best = max(ok, key=lambda r: r["valid"])
            sys.stdout.write(
                f"best on validation, {model}: lr x{best['fu']:g}, item_lr x{best['fi']:g} "
                f"(valid {best['valid']:.4f}, test {best['test']:.4f})\n"
            )


if __name__ == "__main__":
    main()
