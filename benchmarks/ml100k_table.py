"""Base models with and without GFMFR on ML-100K (shared content), over seeds: mean +- std table.

Every run is one ``gfmfr.run.run`` call (full ranking, leave-one-out, test at the best
validation round). Finished runs are appended to ``--out`` (JSON lines) and reused when the
script is started again, so it can be interrupted.

    python benchmarks/ml100k_table.py --models fcf fedrap --plugins none gfmfr --seeds 0 1 2 \
        --content ../shared/datasets/ml-100k-content --out runs/ml100k.jsonl [--set federation.rounds=40]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

METRICS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50")


def run_one(overrides: dict, dataset) -> dict:
    from gfmfr.config import from_dict
    from gfmfr.run import run

    res = run(from_dict(overrides), dataset=dataset)
    seconds = {}
    for h in res["history"]:
        for k, v in h["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + v
    n = len(res["history"])
    last = res["history"][-1]
    return {
        "test": {m: res["test"][m] for m in METRICS},
        "valid": {m: res["valid"][m] for m in METRICS},
        "best_round": res["best_round"],
        "rounds_run": n,
        "seconds_per_round": res["seconds_per_round"],
        "phase_seconds_per_round": {k: v / n for k, v in seconds.items()},
        "peak_rss_mb": res["peak_rss_mb"],
        "bytes_up_per_client": last["bytes_up_per_client"],
        "bytes_down_per_client": last["bytes_down_per_client"],
        "extra": {k: v for k, v in last.get("extra", {}).items() if not isinstance(v, list)},
    }


def load_done(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = row
    return done


def summarize(rows: list[dict], group_keys: list[str], baseline: tuple[str, str] | None = None) -> str:
    """Test mean +- std over the seeds that finished, one line per group; diverged seeds are counted apart.

    With ``baseline = (key, value)`` (e.g. ``("plugin", "none")``), each line also gets the mean paired
    difference of test and valid NDCG@10 against the row with ``key = value`` and the same other spec.
    """

    def ndcg(r: dict, split: str) -> float:
        return r["result"][split]["NDCG@10"]

    def partner(r: dict) -> dict | None:
        if baseline is None:
            return None
        want = {**r["spec"], baseline[0]: baseline[1]}
        return next((b for b in rows if b["spec"] == want and "diverged" not in b), None)

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r["spec"][k] for k in group_keys), []).append(r)
    head = group_keys + list(METRICS) + ["valid NDCG@10", "s/round", "seeds", "diverged"]
    if baseline:
        head += ["paired test diff", "paired valid diff"]
    lines = [" | ".join(head)]
    for key, group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs = [r for r in group if "diverged" not in r]
        failed = len(group) - len(rs)
        if not rs:
            lines.append(" | ".join([str(k) for k in key] + ["-"] * (len(head) - len(key) - 2) + ["0", str(failed)]))
            continue
        cells = []
        for m in METRICS:
            v = np.array([r["result"]["test"][m] for r in rs])
            cells.append(f"{v.mean():.4f} +- {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
        valid = np.mean([ndcg(r, "valid") for r in rs])
        sec = np.mean([r["result"]["seconds_per_round"] for r in rs])
        cells += [f"{valid:.4f}", f"{sec:.2f}", str(len(rs)), str(failed)]
        if baseline:
            pairs = [(r, b) for r in rs if (b := partner(r)) is not None]
            for split in ("test", "valid"):
                d = [ndcg(r, split) - ndcg(b, split) for r, b in pairs]
                cells.append(f"{np.mean(d):+.4f} ({', '.join(f'{x:+.4f}' for x in d)})" if d else "-")
        lines.append(" | ".join([str(k) for k in key] + cells))
    return "\n".join(lines)


def run_grid(jobs: list[tuple[dict, list[str]]], content: str, out: Path) -> list[dict]:
    """Run every (spec, overrides) job not already in ``out`` (JSON lines); return all rows in job order.

    A run that diverges (``FloatingPointError``) is recorded as ``{"diverged": message}`` and the
    grid goes on: a diverged seed is a result, and dropping it silently would flatter the table.
    """
    from gfmfr.config import DataConfig, apply_overrides
    from gfmfr.data.dataset import load_dataset

    out.parent.mkdir(parents=True, exist_ok=True)
    done = load_done(out)
    dataset = load_dataset(DataConfig(content=content))
    rows = []
    for spec, overrides in jobs:
        key = json.dumps(spec, sort_keys=True)
        if key not in done:
            values = apply_overrides({"seed": spec["seed"], "data": {"content": content}}, overrides)
            try:
                row = {"key": key, "spec": spec, "result": run_one(values, dataset)}
            except FloatingPointError as exc:
                row = {"key": key, "spec": spec, "diverged": str(exc)}
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            done[key] = row
            if "diverged" in row:
                logging.warning("%s: diverged: %s", key, row["diverged"])
            else:
                r = row["result"]
                logging.warning(
                    "%s: test NDCG@10 %.4f (best round %d, %.2f s/round)",
                    key,
                    r["test"]["NDCG@10"],
                    r["best_round"],
                    r["seconds_per_round"],
                )
        rows.append(done[key])
    return rows


def common_args(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--content", default="../shared/datasets/ml-100k-content")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcf", "fedncf", "pfedrec", "fedrap"])
    parser.add_argument("--plugins", nargs="+", default=["none", "gfmfr"])
    common_args(parser, "runs/ml100k.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    jobs = [
        (
            {"model": model, "plugin": plugin, "seed": seed, "set": sorted(args.set)},
            [f"model.name={model}", f"plugin={plugin}", *args.set],
        )
        for seed in args.seeds  # seed outermost: an interrupted run leaves a balanced table
        for model in args.models
        for plugin in args.plugins
    ]
    rows = run_grid(jobs, args.content, Path(args.out))
    sys.stdout.write(summarize(rows, ["model", "plugin"], ("plugin", "none")) + "\n")


if __name__ == "__main__":
    main()
