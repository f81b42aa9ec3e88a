"""Flower against the in-process engine on ML-100K: the largest difference in any per-round
validation metric, every model with and without GFMFR, on 1, 3 and 40 nodes.

The Flower side runs the real ServerApp, strategy and ClientApp code over
:class:`gfmfr.flower.local.LocalGrid` (Flower messages and records, no Ray: Ray's transport moves
the same records; ``tests/test_flower.py`` also runs Flower's simulation engine and a deployment).

    python benchmarks/flower_equivalence.py [--rounds 3] [--nodes 1 3 40] [--content ../shared/datasets/ml-100k-content]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fcf", "fedncf", "pfedrec", "fedrap"])
    parser.add_argument("--plugins", nargs="+", default=["none", "gfmfr"])
    parser.add_argument("--nodes", nargs="+", type=int, default=[1, 3, 40])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--content", default="../shared/datasets/ml-100k-content")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from flwr.app import Context, RecordDict

    from gfmfr.config import from_dict, to_toml
    from gfmfr.data.dataset import load_dataset
    from gfmfr.flower import client_app, server_app
    from gfmfr.flower.local import LocalGrid
    from gfmfr.run import run

    sys.stdout.write(
        "| model | plug-in | nodes | max abs diff, per-round valid metrics | test NDCG@10 "
        "(Flower / in-process) | s |\n|---|---|---|---|---|---|\n"
    )
    dataset = None
    for model in args.models:
        for plugin in args.plugins:
            cfg = from_dict(
                {
                    "data": {"dataset": "ml-100k", "content": args.content},
                    "model": {"name": model},
                    "plugin": plugin,
                    "federation": {"rounds": args.rounds},
                    "runtime": {"threads": 1},
                }
            )
            dataset = dataset if dataset is not None else load_dataset(cfg.data)
            inprocess = run(cfg, dataset=dataset)
            for nodes in args.nodes:
                t0 = time.perf_counter()
                client_app._NODES.clear()
                result: dict = {}
                grid = LocalGrid(client_app.make_client_app({"config": to_toml(cfg)}), nodes)
                server_app.main(grid, Context(1, 0, {}, RecordDict(), {}), {"config": to_toml(cfg)}, dataset, result)
                diff = max(
                    abs(a["valid"][k] - b["valid"][k])
                    for a, b in zip(result["history"], inprocess["history"])
                    for k in b["valid"]
                )
                sys.stdout.write(
                    f"| {model} | {plugin} | {nodes} | {diff:.1e} | {result['test']['NDCG@10']:.6f} / "
                    f"{inprocess['test']['NDCG@10']:.6f} | {time.perf_counter() - t0:.0f} |\n"
                )
                sys.stdout.flush()


if __name__ == "__main__":
    main()
