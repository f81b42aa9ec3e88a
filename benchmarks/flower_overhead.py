"""What running on Flower costs: seconds per round and peak RSS against the in-process engine (ML-100K).

For each model, in its own subprocess each (so that peak RSS is its own):
- ``in-process``: the batched engine;
- ``local-2``: the ServerApp and ClientApp code on 2 nodes over :class:`gfmfr.flower.local.LocalGrid`
  (Flower messages and records, no Ray): our own code plus serialisation;
- ``flower-2``, ``flower-16``: Flower's simulation engine (Ray), 2 and 16 nodes, one CPU each;
- ``deployed-3``: a real SuperLink and 3 SuperNodes on this machine (``flwr run``), each message run by
  a ClientApp process of its own (Flower's default isolation);
- ``deployed-3-workers``: the same, each SuperNode's messages run by one long-lived ``gfmfr
  node-worker`` (``--isolation process``);
- ``one-user-per-node``: one node per user (943), 100 sampled users a round (and its in-process twin,
  ``in-process-100``, with the same sampling). These two validate only after the last round.
Peak RSS is of the whole process tree (the driver and Ray's workers), sampled every 0.5 s.
A round's time is train + aggregate + server work + validation, mean over rounds 1 .. R-1 (round 0
starts the nodes). Each Flower row says how far its per-round validation metrics are from the
in-process run's (max abs difference; 0 means identical) and the bytes of tensors a trained client
receives and sends per round over Flower. ``serialise`` times encoding and decoding one round's
uploads of every user (the records a 1-node federation would send).

    python benchmarks/flower_overhead.py [--models fcf fedrap] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time

import numpy as np

VARIANTS = (
    "in-process",
    "local-2",
    "flower-2",
    "flower-16",
    "deployed-3",
    "deployed-3-workers",
    "in-process-100",
    "one-user-per-node",
)


def config(model: str, variant: str, rounds: int):
    from gfmfr.config import from_dict

    values = {
        "model": {"name": model},
        "federation": {"rounds": rounds, "early_stop_patience": 0},
        "runtime": {"threads": 1},
    }
    if variant in ("in-process-100", "one-user-per-node"):
        values["federation"].update(client_fraction=100 / 943, eval_every=rounds)
    if variant.startswith("flower-"):
        values["runtime"].update(backend="flower", nodes=int(variant.split("-")[1]))
    if variant == "one-user-per-node":
        values["runtime"].update(backend="flower", nodes=943)
    return from_dict(values)


def tree_rss_bytes(root: int) -> int:
    """Resident memory of process ``root`` and all its descendants (Linux /proc)."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


class TreeRss:
    """Peak resident memory of this process and every process it started (Ray's workers), sampled."""

    def __init__(self, every: float = 0.5):
        import os
        import threading

        self.peak, self.every, self.done, self.pid = 0, every, threading.Event(), os.getpid()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self.done.wait(self.every)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 2**20


def measure(model: str, variant: str, rounds: int) -> dict:
    from gfmfr.config import to_toml
    from gfmfr.run import run

    cfg = config(model, variant, rounds)
    rss = TreeRss()
    t0 = time.perf_counter()
    if variant == "local-2":
        from flwr.app import Context, RecordDict

        from gfmfr.flower import client_app, server_app
        from gfmfr.flower.local import LocalGrid

        results: dict = {}
        grid = LocalGrid(client_app.make_client_app({"config": to_toml(cfg)}), 2)
        server_app.main(grid, Context(1, 0, {}, RecordDict(), {}), {"config": to_toml(cfg)}, None, results)
    elif variant.startswith("deployed-3"):
        import tempfile
        from pathlib import Path

        from gfmfr.flower.deploy import LocalDeployment

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "run.toml").write_text(to_toml(cfg))
            with LocalDeployment(Path(tmp) / "deployment", 3, workers=variant.endswith("workers")) as local:
                local.submit(Path(tmp) / "run.toml", Path(tmp) / "out")
                results = local.results(Path(tmp) / "out", 1800)
    else:
        results = run(cfg)
    wall = time.perf_counter() - t0
    per_round = [sum(h["seconds"].values()) for h in results["history"]]
    return {
        "model": model,
        "variant": variant,
        "seconds_per_round": float(np.mean(per_round[1:])),
        "round_seconds": per_round,
        "wall": wall,
        "peak_rss_mb": rss.stop(),
        "valid": [h["valid"] for h in results["history"]],
        "flower": results.get("flower"),
    }


def serialise(model: str) -> dict:
    """Seconds to encode and decode one round's uploads of every ML-100K user, and their size."""
    from gfmfr.data.dataset import load_dataset
    from gfmfr.federation.batched import train_clients
    from gfmfr.federation.engine import Federation
    from gfmfr.flower import wire
    from gfmfr.flower.strategy import record_bytes
    from gfmfr.models import build_model

    cfg = config(model, "in-process", 1)
    data = load_dataset(cfg.data)
    fed = Federation(data, build_model(data.n_items, cfg.model), cfg)
    update = train_clients(fed.model, fed.state, np.arange(data.n_users), data, cfg.federation, cfg.seed, 0)
    t0 = time.perf_counter()
    content = wire.encode_update(update)
    t1 = time.perf_counter()
    wire.decode_update(content)
    return {"encode_s": t1 - t0, "decode_s": time.perf_counter() - t1, "bytes": record_bytes(content)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcf", "fedrap"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        model, variant = args.one
        out = serialise(model) if variant == "serialise" else measure(model, variant, args.rounds)
        sys.stdout.write("RESULT " + json.dumps(out) + "\n")
        return
    sys.stdout.write(
        "| model | variant | s/round | vs in-process | peak RSS MB | max |valid diff| | "
        "bytes down / up per client |\n|---|---|---|---|---|---|---|\n"
    )
    for model in args.models:
        base: dict[str, dict] = {}
        for variant in [*args.variants, "serialise"]:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", model, variant, "--rounds", str(args.rounds)],
                capture_output=True,
                text=True,
            )
            line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
            if line is None:
                sys.stdout.write(f"| {model} | {variant} | failed: {proc.stderr.strip().splitlines()[-1:]} |\n")
                continue
            r = json.loads(line[len("RESULT ") :])
            if variant == "serialise":
                sys.stdout.write(
                    f"\n{model}: encoding one round's uploads of 943 users ({r['bytes'] / 2**20:.1f} MiB) "
                    f"{r['encode_s']:.3f} s, decoding {r['decode_s']:.3f} s\n\n"
                )
                continue
            twin = base.get("in-process-100" if variant == "one-user-per-node" else "in-process")
            diff = ""
            if twin is not None and variant.startswith(("local", "flower", "one", "deployed")):
                diff = max(
                    (abs(a[k] - b[k]) for a, b in zip(r["valid"], twin["valid"]) if a and b for k in b),
                    default=float("nan"),
                )
                diff = f"{diff:.1e}"
            ratio = (
                f"+{r['seconds_per_round'] - twin['seconds_per_round']:.2f} s"
                if twin is not None and not variant.startswith("in-process")
                else ""
            )
            wire_bytes = r["flower"]["wire_bytes_per_client"] if r.get("flower") else None
            bytes_col = f"{wire_bytes['down']:,.0f} / {wire_bytes['up']:,.0f}" if wire_bytes else ""
            sys.stdout.write(
                f"| {model} | {variant} | {r['seconds_per_round']:.2f} | {ratio} | "
                f"{r['peak_rss_mb']:.0f} | {diff} | {bytes_col} |\n"
            )
            sys.stdout.flush()
            base[variant] = r


if __name__ == "__main__":
    main()
