"""Every method on Flower with ML-100K's real content: the simulation engine and a deployment, against
in-process.

For each method (the four base models, GFMFR on each, MM-FCF and FedVLR-FCF), with the posters, plots
and cast of ``--content`` (``../shared/datasets/ml-100k-content``): ``--rounds`` rounds in process, on
Flower's simulation engine (2 nodes, Ray) and deployed (a SuperLink and 3 SuperNodes on this machine,
each with a ``gfmfr node-worker``; :class:`gfmfr.flower.deploy.LocalDeployment`). It prints whether each
run finished, its seconds per round, and the largest difference of its per-round validation metrics
from the in-process run's.

    python benchmarks/flower_real_content.py [--rounds 2] [--content ../shared/datasets/ml-100k-content]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from gfmfr.config import from_dict, to_toml
from gfmfr.flower.deploy import LocalDeployment
from gfmfr.run import run

METHODS = [
    ("fcf", "none", "none"),
    ("fedncf", "none", "none"),
    ("pfedrec", "none", "none"),
    ("fedrap", "none", "none"),
    ("fcf", "gfmfr", "none"),
    ("fedncf", "gfmfr", "none"),
    ("pfedrec", "gfmfr", "none"),
    ("fedrap", "gfmfr", "none"),
    ("fcf", "none", "mmx"),
    ("fcf", "none", "fedvlr"),
]


def name(model: str, plugin: str, wrapper: str) -> str:
    base = {"fcf": "FCF", "fedncf": "FedNCF", "pfedrec": "PFedRec", "fedrap": "FedRAP"}[model]
    if plugin == "gfmfr":
        return f"GFMFR-{base}"
    return {"mmx": f"MM-{base}", "fedvlr": f"FedVLR-{base}"}.get(wrapper, base)


def max_diff(a: dict, b: dict) -> float:
    return max(
        (
            abs(x["valid"][k] - y["valid"][k])
            for x, y in zip(a["history"], b["history"])
            if y["valid"]
            for k in y["valid"]
        ),
        default=float("nan"),
    )


def per_round(result: dict) -> float:
    rounds = [sum(h["seconds"].values()) for h in result["history"]]
    return sum(rounds[1:]) / max(len(rounds) - 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--content", default="../shared/datasets/ml-100k-content")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    content = str(Path(args.content).resolve())

    rows = []
    for model, plugin, wrapper in METHODS:
        values = {
            "data": {"dataset": "ml-100k", "content": content},
            "model": {"name": model},
            "plugin": plugin,
            "wrapper": wrapper,
            "federation": {"rounds": args.rounds, "early_stop_patience": 0},
            "runtime": {"threads": 1, "save_model": False},
        }
        cfg = from_dict(values)
        local = run(cfg)
        cells = [name(model, plugin, wrapper), f"{per_round(local):.2f}"]
        simulated = run(from_dict({**values, "runtime": {**values["runtime"], "backend": "flower", "nodes": 2}}))
        cells += [f"{per_round(simulated):.2f}", f"{max_diff(simulated, local):.1e}"]
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "run.toml").write_text(to_toml(cfg))
            t0 = time.perf_counter()
            with LocalDeployment(Path(tmp) / "deployment", 3, workers=True) as deployment:
                deployment.submit(Path(tmp) / "run.toml", Path(tmp) / "out", timeout=120)
                deployed = deployment.results(Path(tmp) / "out", 1800)
            cells += [f"{per_round(deployed):.2f}", f"{max_diff(deployed, local):.1e}"]
            logging.warning("%s: deployed in %.0f s", cells[0], time.perf_counter() - t0)
        rows.append(cells)

    print(f"\nevery method on Flower with ML-100K's real content ({content}), {args.rounds} rounds")
    print(
        "| method | in-process s/round | simulation (2 nodes) s/round | max abs valid diff "
        "| deployed (3 nodes, workers) s/round | max abs valid diff |"
    )
    print("|---|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
