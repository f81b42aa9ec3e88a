"""How a round's cost grows with the federation: seconds per round, peak memory and bytes per client
for 1K to 1M users, every base model with and without GFMFR, at full participation and at 1% sampling.

Data: :func:`gfmfr.data.synthetic.synthetic_dataset` (lognormal activity with a median of 20
interactions, Zipf item popularity, items growing with users as in public datasets: 1.7K items for
1K users to 50K for 1M; 512-d random text features for GFMFR). Defaults otherwise (one local epoch,
d = 64, GFMFR's server work every 5 rounds from round 0). Each point runs in a process of its own
(its peak RSS is its own), capped at ``--memory-gb`` of address space and ``--timeout`` seconds; a
point that exceeds either is reported as such. Rounds 0, 1 and 2 are run; a round's cost is
amortised over GFMFR's server cadence, (t0 + 4 * mean(t1, t2)) / 5, for every model alike (round 0
also carries one-off warm-up). Bytes per client: the item rows and signatures a participant uploads
(mean over the round's participants) and what it receives (the dense shared parameters plus GFMFR's
hint rows), float32.

    python benchmarks/scaling.py [--users 1000 10000 100000 1000000] [--models fcf] [--out docs/scaling]

Writes ``OUT/scaling.md`` (the table), ``OUT/scaling.json`` and ``OUT/scaling.svg`` (users against
seconds per round and peak memory, log-log).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

from runner import uploads


def point(users: int, model: str, plugin: str, fraction: float, threads: int) -> dict:
    """Measure one point in this process; the result as a dict."""
    import numpy as np

    from gfmfr.build import build_run_model
    from gfmfr.config import from_dict
    from gfmfr.data.synthetic import synthetic_dataset
    from gfmfr.federation.engine import Federation
    from gfmfr.results import peak_rss_mb
    from gfmfr.runtime import use_threads

    use_threads(threads)
    t0 = time.perf_counter()
    data = synthetic_dataset(users)
    build_s = time.perf_counter() - t0
    cfg = from_dict(
        {
            "model": {"name": model},
            "plugin": plugin,
            "federation": {"client_fraction": fraction},
            "gfmfr": {"modalities": ["text"]},
        }
    )
    net, plugins = build_run_model(data, cfg)
    fed = Federation(data, net, cfg, plugins)
    seconds, clients = [], 0
    with uploads() as seen:
        for t in range(3):
            seen.clear()
            t1 = time.perf_counter()
            entry = fed.train_round(t)
            seconds.append(time.perf_counter() - t1)
            clients = entry.clients
    # (clients, rows, signature floats) per uploaded chunk of the last round
    uploaded = [(u.clients, u.rows, u.signature_floats) for u in seen]
    n_clients = max(1, sum(c for c, _, _ in uploaded))
    d = cfg.model.dim
    up = sum(r * (4 * d + 4) + 4 * s for _, r, s in uploaded) / n_clients
    down = entry.bytes_down_per_client
    return {
        "users": data.n_users,
        "items": data.n_items,
        "interactions": data.report["interactions"],
        "model": model,
        "plugin": plugin,
        "fraction": fraction,
        "clients": clients,
        "round_seconds": [float(s) for s in seconds],
        "seconds_per_round": float((seconds[0] + 4 * np.mean(seconds[1:])) / 5),
        "peak_rss_mb": peak_rss_mb(),
        "bytes_up_per_client": float(up),
        "bytes_down_per_client": float(down),
        "data_seconds": build_s,
    }


def run_point(args: argparse.Namespace, users: int, model: str, plugin: str, fraction: float) -> dict:
    """:func:`point` in a child process with the memory and time caps."""
    limit = int(args.memory_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [
        sys.executable,
        __file__,
        "--point",
        str(users),
        model,
        plugin,
        str(fraction),
        "--threads",
        str(args.threads),
    ]
    base = {"users": users, "model": model, "plugin": plugin, "fraction": fraction}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"over {args.timeout:.0f} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        memory = "MemoryError" in proc.stderr or "Cannot allocate" in proc.stderr or proc.returncode == -9
        return {**base, "error": f"over {args.memory_gb:g} GB" if memory else tail[0][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


NAMES = {"fcf": "FCF", "fedncf": "FedNCF", "pfedrec": "PFedRec", "fedrap": "FedRAP"}


def label(row: dict) -> str:
    name = NAMES.get(row["model"], row["model"])
    return name if row["plugin"] == "none" else f"GFMFR-{name}"


def order(row: dict) -> tuple:
    """Size (a point that failed carries the size asked for, one that ran the size built), model,
    base before GFMFR, full participation first."""
    return (round(math.log10(row["users"])), list(NAMES).index(row["model"]), row["plugin"] != "none", -row["fraction"])


def table(rows: list[dict]) -> str:
    lines = [
        "| users | items | model | fraction | participants | s/round | peak RSS MB | up KB/client | down KB/client |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['users']:,} | | {label(r)} | {r['fraction']:g} | | {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['users']:,} | {r['items']:,} | {label(r)} | {r['fraction']:g} | {r['clients']:,} "
            f"| {r['seconds_per_round']:.2f} | {r['peak_rss_mb']:.0f} | {r['bytes_up_per_client'] / 1024:.1f} "
            f"| {r['bytes_down_per_client'] / 1024:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            series.setdefault(f"{label(r)}, {r['fraction']:g}", []).append(r)
    methods = sorted({label(r) for r in rows})
    colours = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))
    for name, points in sorted(series.items()):
        points.sort(key=lambda r: r["users"])
        xs = [r["users"] for r in points]
        style = dict(color=colours[label(points[0])], marker="o", linestyle="-" if points[0]["fraction"] == 1 else "--")
        axes[0].plot(xs, [r["seconds_per_round"] for r in points], label=name, **style)
        axes[1].plot(xs, [r["peak_rss_mb"] / 1024 for r in points], label=name, **style)
    for ax, ylabel in zip(axes, ["seconds per round", "peak RSS (GB)"], strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("users")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("Cost of a round against the federation's size (synthetic; solid: every client, dashed: 1%)")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    plt.rcParams["svg.hashsalt"] = "gfmfr"  # stable element ids: the committed file changes only with the data
    fig.savefig(path, metadata={"Date": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", nargs=4, metavar=("USERS", "MODEL", "PLUGIN", "FRACTION"), help=argparse.SUPPRESS)
    parser.add_argument("--users", nargs="+", type=int, default=[1000, 10000, 100000, 1000000])
    parser.add_argument("--models", nargs="+", default=["fcf", "pfedrec", "fedncf", "fedrap"])
    parser.add_argument("--plugins", nargs="+", default=["none", "gfmfr"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.01])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a point may take")
    parser.add_argument("--memory-gb", type=float, default=20.0, help="address space a point may take")
    parser.add_argument("--out", default="docs/scaling")
    args = parser.parse_args()
    if args.point:
        users, model, plugin, fraction = args.point
        sys.stdout.write(json.dumps(point(int(users), model, plugin, float(fraction), args.threads)) + "\n")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "scaling.json"
    rows: list[dict] = json.loads(done.read_text()) if done.exists() else []
    have = {(10 ** round(math.log10(r["users"])), r["model"], r["plugin"], r["fraction"]) for r in rows}
    for users in args.users:
        for model in args.models:
            for plugin in args.plugins:
                for fraction in args.fractions:
                    if (users, model, plugin, fraction) in have:
                        continue
                    rows.append(run_point(args, users, model, plugin, fraction))
                    sys.stdout.write(table(rows[-1:]).splitlines()[-1] + "\n")
                    sys.stdout.flush()
                    done.write_text(json.dumps(rows, indent=1))
    rows.sort(key=order)
    (out / "scaling.md").write_text(table(rows))
    plot(rows, out / "scaling.svg")
    sys.stdout.write(table(rows))


if __name__ == "__main__":
    main()
