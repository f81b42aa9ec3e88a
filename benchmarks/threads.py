"""Seconds per round on a quiet machine and with another process saturating one core, side by side.

Settings (each model in its own subprocess, since OpenMP reads its wait policy when torch loads):

- ``before``: what runs did before ``runtime.threads`` existed: torch's default thread count (one
  per core) and OpenMP's default wait policy (``OMP_WAIT_POLICY`` empty: idle workers spin);
- ``default``: gfmfr's defaults (``runtime.threads = 1``, passive wait);
- ``passive-all-cores``: passive wait with one thread per core (``runtime.threads = 0``).

"contended" runs the same with a busy-looping Python process pinned to nothing (the scheduler
places it), started before the run and killed after. The figure of merit is contended / quiet
per setting (target: at most 1.5 for ``default``) and default-quiet / before-quiet (at most 1).

    python benchmarks/threads.py [--models fcf fedrap] [--rounds 6] [--local-epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "before": ({"OMP_WAIT_POLICY": ""}, 0),
    "default": ({}, 1),
    "passive-all-cores": ({}, 0),
    "spin-1k-all-cores": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "1000"}, 0),
    "spin-3k-all-cores": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "3000"}, 0),
    "spin-10k-all-cores": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"}, 0),
    "spin-100k-all-cores": ({"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "100000"}, 0),
}


def measure(model: str, rounds: int, local_epochs: int, threads: int) -> dict:
    import numpy as np

    from gfmfr.config import from_dict
    from gfmfr.data.dataset import load_dataset
    from gfmfr.federation.engine import Federation
    from gfmfr.models import build_model
    from gfmfr.runtime import use_threads

    n = use_threads(threads)
    cfg = from_dict({"model": {"name": model}, "federation": {"local_epochs": local_epochs}})
    data = load_dataset(cfg.data)
    fed = Federation(data, build_model(data.n_items, cfg.model), cfg)
    times = []
    for t in range(rounds):
        t0 = time.perf_counter()
        fed.train_round(t)
        fed.evaluator.evaluate(fed.score, "valid")
        times.append(time.perf_counter() - t0)
    return {"seconds": float(np.median(times[1:])), "threads": n}


def run_child(model: str, rounds: int, local_epochs: int, setting: str) -> dict:
    env_extra, threads = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    cmd = [sys.executable, __file__, "--child", model, str(rounds), str(local_epochs), str(threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, rounds, epochs, threads = sys.argv[2], *map(int, sys.argv[3:6])
        sys.stdout.write(json.dumps(measure(model, rounds, epochs, threads)) + "\n")
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcf", "fedrap"])
    parser.add_argument(
        "--rounds", type=int, default=6, help="rounds (train + validation); median of all but the first"
    )
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for setting in args.settings:
            quiet = run_child(model, args.rounds, args.local_epochs, setting)
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(0.5)
                busy = run_child(model, args.rounds, args.local_epochs, setting)
            finally:
                hog.kill()
                hog.wait()
            rows.append((model, setting, quiet["threads"], quiet["seconds"], busy["seconds"]))
            sys.stderr.write(f"{rows[-1]}\n")
    base = {m: q for m, s, _, q, _ in rows if s == "before"}
    sys.stdout.write(
        "| model | setting | threads | quiet s/round | contended s/round | contended / quiet | quiet / before-quiet |\n"
    )
    sys.stdout.write("|---|---|---|---|---|---|---|\n")
    for model, setting, n, quiet, busy in rows:
        rel = f"{quiet / base[model]:.2f}" if model in base else "-"
        sys.stdout.write(f"| {model} | {setting} | {n} | {quiet:.3f} | {busy:.3f} | {busy / quiet:.2f} | {rel} |\n")


if __name__ == "__main__":
    main()
