"""Command line: ``gfmfr config``, ``gfmfr data``, ``gfmfr run``, ``gfmfr tune``, ``gfmfr compare``,
``gfmfr encode``, ``gfmfr recommend``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from gfmfr.coldstart import cold_rows
from gfmfr.compare import compare, load_plan, render_report
from gfmfr.config import (
    SCORE_BASELINES,
    ConfigError,
    apply_overrides,
    from_dict,
    load_toml,
    to_toml,
)
from gfmfr.data.dataset import load_dataset
from gfmfr.data.encoders import encode_content
from gfmfr.data.errors import DataError
from gfmfr.run import run
from gfmfr.serving.errors import ModelError
from gfmfr.serving.new_items import new_item_scores, new_item_vectors, read_new_items
from gfmfr.serving.recommend import blocks, top_k
from gfmfr.serving.saved import load_model
from gfmfr.standing import references, standing_line
from gfmfr.tune import load_space, tune

log = logging.getLogger("gfmfr")


def _config(args: argparse.Namespace) -> Any:
    return from_dict(_config_values(args))


def _config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config as nested dicts: the TOML file, then the flags, then ``--set`` overrides."""
    values = load_toml(args.config) if getattr(args, "config", None) else {}
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "dataset", None):
        overrides.append(f"data.dataset={args.dataset}")
    if getattr(args, "content", None):
        overrides.append(f"data.content={args.content}")
    if getattr(args, "split", None):
        overrides.append(f"data.split={args.split}")
    if getattr(args, "model", None):
        overrides.append(f"model.name={args.model}")
    if getattr(args, "wrapper", None):
        overrides.append(f"wrapper={args.wrapper}")
    if getattr(args, "plugin", None):
        overrides.append(f"plugin={args.plugin}")
    if getattr(args, "centralised", False):
        overrides.append("training=centralised")
    if getattr(args, "backend", None):
        overrides.append(f"runtime.backend={args.backend}")
    if getattr(args, "nodes", None) is not None:
        overrides.append(f"runtime.nodes={args.nodes}")
    if getattr(args, "threads", None) is not None:
        overrides.append(f"runtime.threads={args.threads}")
    values = apply_overrides(values, overrides)
    if getattr(args, "seed", None) is not None:
        values["seed"] = args.seed
    from_dict(values)  # every key and value checked before anything runs
    return values


def format_table(rows: dict[str, dict[str, float]], ks: tuple[int, ...]) -> str:
    """A plain-text table: one row per split, HR/NDCG/Recall/MRR at every K as columns."""
    cols = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG", "MRR")]
    width = max([8, *(len(name) + 1 for name in rows)])
    lines = [f"{'split':<{width}}" + "".join(f"{c:>10}" for c in cols)]
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{metrics.get(c, float('nan')):>10.4f}" for c in cols))
    return "\n".join(lines)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved configuration (defaults, then ``--config``, flags and ``--set``) as TOML
    that ``gfmfr run --config`` reads back."""

    sys.stdout.write(to_toml(_config(args)))
    return 0


def cmd_data(args: argparse.Namespace) -> int:

    dataset = load_dataset(_config(args).data)
    if args.json:
        sys.stdout.write(json.dumps(dataset.report, indent=2) + "\n")
    else:
        for key, value in dataset.report.items():
            sys.stdout.write(f"{key:>40}: {value}\n")
    return 0


def writable_folder(path: str | None, flag: str = "--out") -> None:
    """Create ``path`` if needed; a folder that cannot be created or written is a one-line error."""
    if path is None:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / ".gfmfr-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


def cmd_run(args: argparse.Namespace) -> int:

    cfg = _config(args)
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out: the folder of the run to continue")
    if args.out and not (args.resume or args.overwrite):
        held = [name for name in ("results.json", "checkpoint.safetensors") if (Path(args.out) / name).exists()]
        if held:
            raise ConfigError(
                f"--out {args.out} already holds a run ({', '.join(held)}); "
                "give --resume to continue it or --overwrite to start again"
            )
    writable_folder(args.out)
    if args.overwrite and args.out:
        (Path(args.out) / "checkpoint.safetensors").unlink(missing_ok=True)
    results = run(cfg, args.out, progress=not (args.verbose or args.no_progress), resume=args.resume)
    sys.stdout.write(
        f"\n{cfg.wrapper + '(' if cfg.wrapper != 'none' else ''}{cfg.model.name}"
        f"{')' if cfg.wrapper != 'none' else ''}{'+' + cfg.plugin if cfg.plugin != 'none' else ''}"
        f"{' (centralised)' if cfg.training == 'centralised' else ''} on {cfg.data.dataset} "
        f"({cfg.eval.protocol} ranking), best round {results['best_round']} "
        f"by validation {cfg.eval.select_metric}; {results['seconds_per_round']:.2f} s/round, "
        f"peak RSS {results['peak_rss_mb']:.0f} MB\n"
    )
    rows = {"valid": results["valid"], "test": results["test"]}
    if cfg.data.split == "cold-items":  # no reference ranks cold items: each source's row instead
        sys.stdout.write(format_table(cold_rows(results, cfg), cfg.eval.ks) + "\n")
    elif cfg.training == "federated" and cfg.model.name not in SCORE_BASELINES and not args.no_reference:
        refs = references(load_dataset(cfg.data), cfg)
        rows.update({"pop": refs["popularity"]["test"], "central": refs["centralised"]["test"]})
        sys.stdout.write(format_table(rows, cfg.eval.ks) + "\n")
        sys.stdout.write(standing_line(results, refs, cfg.eval.select_metric) + "\n")
    if cfg.plugin == "gfmfr" and cfg.training == "federated":
        sys.stdout.write(gfmfr_line(results, cfg) + "\n")
    else:
        sys.stdout.write(format_table(rows, cfg.eval.ks) + "\n")
    if args.out:
        sys.stdout.write(f"results: {args.out}/results.json\n")
    return 0


def cmd_node_worker(args: argparse.Namespace) -> int:
    if not args.insecure and not args.root_certificates:
        raise ConfigError("node-worker: give --insecure (same machine) or --root-certificates for TLS")
    from gfmfr.flower.worker import serve  # Flower is an optional extra (its package sets Flower's environment)

    serve(args.runtime_api_address, args.insecure, args.root_certificates)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:

    values = _config_values(args)
    space = load_space(args.space) if args.space else None
    result = tune(
        values,
        args.out,
        space,
        trials=args.trials,
        budget_s=args.budget,
        progress=not (args.verbose or args.no_progress),
    )
    sys.stdout.write(
        f"best of {result['complete']} finished trials ({result['trials']} started): validation "
        f"{result['value']:.4f} with {result['params']}\nconfig: {args.out}/best.toml (gfmfr run --config), "
        f"trials: {args.out}/trials.csv\n"
    )
    return 0


def cmd_encode(args: argparse.Namespace) -> int:

    cfg = _config(args)
    if cfg.data.content is None:
        raise ConfigError("gfmfr encode needs --content DIR")
    result = encode_content(cfg.data, modalities=tuple(args.modality), batch_size=args.batch_size)
    sys.stdout.write(json.dumps(result.report, indent=2) + "\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:

    plan = load_plan(args.config)
    if args.report_only:
        report = render_report(plan, args.out)
    else:
        report = compare(plan, args.out, progress=not args.no_progress, jobs=args.jobs)
    sys.stdout.write(report.read_text())
    sys.stdout.write(f"\nreport: {report}\n")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:

    if (args.user is None) == (not args.all_users):
        raise ConfigError("recommend: give --user ID or --all-users (with --out FILE)")
    if args.new_items and args.all_users:
        raise ConfigError("recommend: --new-items goes with --user ID")
    t0 = time.perf_counter()
    saved = load_model(args.run)
    t1 = time.perf_counter()
    if args.all_users:
        if not args.out:
            raise ConfigError("recommend --all-users: give --out FILE for the CSV")
        users = np.arange(saved.n_users)
        writable_folder(str(Path(args.out).parent))
        tmp = Path(args.out).with_name(Path(args.out).name + ".part")
        with tmp.open("w") as fh:
            fh.write("user,rank,item,score\n")
            for rec in blocks(saved, users, args.k):
                for u, items, scores in zip(rec.users, rec.items, rec.scores):
                    for rank, (i, s) in enumerate(zip(items, scores), 1):
                        if np.isfinite(s):
                            fh.write(f"{saved.user_ids[u]},{rank},{saved.item_ids[i]},{s:.6g}\n")
        tmp.replace(args.out)
        t2 = time.perf_counter()
        log.info(
            "top-%d of %d users in %.2f s (%.0f users/s; loading %.2f s): %s",
            args.k,
            len(users),
            t2 - t1,
            len(users) / max(t2 - t1, 1e-9),
            t1 - t0,
            args.out,
        )
        return 0
    user = np.array([saved.user_index(args.user)])
    ids, titles, extra = saved.item_ids, saved.titles, None
    if args.new_items:
        new = read_new_items(args.new_items, saved)
        extra = new_item_scores(saved, user, new_item_vectors(saved, new))
        ids, titles = ids + new.ids, titles + new.titles
        log.info("%d new items from %s, scored from their content", len(new), args.new_items)
    t1 = time.perf_counter()
    rec = top_k(saved, user, args.k, extra)
    t2 = time.perf_counter()
    items = [
        {"item": ids[i], "title": titles[i], "score": float(s), "new": bool(i >= saved.n_items)}
        for i, s in zip(rec.items[0], rec.scores[0])
        if np.isfinite(s)
    ]
    if args.json:
        sys.stdout.write(json.dumps({"user": args.user, "round": saved.round, "items": items}, indent=1) + "\n")
    else:
        sys.stdout.write(f"top {len(items)} for user {args.user} (model of round {saved.round}):\n")
        for rank, it in enumerate(items, 1):
            sys.stdout.write(
                f"{rank:>3}  {it['item']:>8}  {it['score']:8.4f}  {it['title']}{'  (new)' if it['new'] else ''}\n"
            )
    log.debug("loading %.3f s, ranking %.4f s", t1 - t0, t2 - t1)
    return 0


EXAMPLES = {
    "config": "gfmfr config --model fcf --plugin gfmfr > run.toml",
    "data": "gfmfr data --dataset ../shared/datasets/ku --json",
    "run": "gfmfr run --dataset ml-100k --model fcf --plugin gfmfr --out runs/gfmfr",
    "tune": "gfmfr tune --dataset ml-100k --model fcf --plugin gfmfr --budget 1800 --out runs/tune",
    "compare": "gfmfr compare --config benchmarks/datasets.toml --out runs/report --jobs 2",
    "recommend": "gfmfr recommend --run runs/gfmfr --user 196 -k 10",
    "encode": "gfmfr encode --content ../shared/datasets/ml-100k-content",
}
"""One example per subcommand, shown at the end of its ``--help``."""


class _DefaultsShown(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default, where it has one of its own (not left to the config)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default not in (None, False, argparse.SUPPRESS)
            and "%(default)" not in text
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def gfmfr_line(results: dict[str, Any], cfg: Any) -> str:
    """What GFMFR's content prior did: the mean share its item rows moved at each server round."""
    shares = [h["extra"]["content_share"] for h in results["history"] if "content_share" in h.get("extra", {})]
    if not shares or cfg.gfmfr.content_prior == 0:
        return (
            "GFMFR: content prior off (gfmfr.content_prior = 0): content reaches the clients only through distillation"
        )
    return (
        f"GFMFR: the content prior moved the item rows {100 * float(sum(shares) / len(shares)):.0f}% of the way to "
        f"their content vectors per server round on average (kappa {cfg.gfmfr.content_prior:g}; rows that "
        "many clients train move less)"
    )


def build_parser() -> argparse.ArgumentParser:

    # -v is accepted before and after the subcommand; the subcommand's copy leaves the value alone unless given
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging, and a traceback with every error",
    )
    parser = argparse.ArgumentParser(prog="gfmfr", description=__doc__, parents=[verbose])
    parser.set_defaults(verbose=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('gfmfr')}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        epilog = f"example:\n  {EXAMPLES[name]}" if name in EXAMPLES else None
        return add_parser(name, parents=[verbose], formatter_class=_DefaultsShown, epilog=epilog, **kwargs)

    sub.add_parser = add  # type: ignore[method-assign]

    def common(p: argparse.ArgumentParser, split: bool = True, training: bool = True) -> None:
        """The options that choose the data and the configuration (and, for commands that train, the
        split, the seed and the threads)."""
        p.add_argument("--dataset", help="ml-100k or a data folder")
        p.add_argument("--content", help="folder with items.csv and images")
        if split:
            p.add_argument(
                "--split",
                choices=["auto", "leave-one-out", "cold-items"],
                help="auto (default: the data's own split_label where it has one, else leave-one-out), "
                "leave-one-out by time, or hold out cold items (data.cold_item_fraction) and "
                "rank them from their content",
            )
        p.add_argument("--config", help="TOML config file")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config field")
        if training:
            p.add_argument("--seed", type=int, help="random seed")
            p.add_argument("--threads", type=int, help="torch threads (runtime.threads; 0: one per core)")

    p = sub.add_parser("config", help="print the resolved configuration as TOML (every default included)")
    common(p)
    p.add_argument(
        "--model",
        choices=["fcf", "fedncf", "pfedrec", "fedrap", "popularity", "content-knn", "random"],
        help="a federated base model, or a baseline that scores without training",
    )
    p.add_argument("--plugin", choices=["none", "gfmfr"], help="plug-in on the federation (GFMFR)")
    p.add_argument(
        "--wrapper", choices=["none", "mmx", "fedvlr"], help="wrap the base model with item content: MM-X or FedVLR"
    )
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("data", help="print the data report")
    common(p, training=False)
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("run", help="train and evaluate one model")
    common(p)
    p.add_argument(
        "--model",
        choices=["fcf", "fedncf", "pfedrec", "fedrap", "popularity", "content-knn", "random"],
        help="a federated base model, or a baseline that scores without training",
    )
    p.add_argument("--plugin", choices=["none", "gfmfr"], help="GFMFR on the federation of the base model")
    p.add_argument(
        "--wrapper", choices=["none", "mmx", "fedvlr"], help="wrap the base model with item content: MM-X or FedVLR"
    )
    p.add_argument(
        "--centralised",
        action="store_true",
        help="train the base model on all data in one place (the upper bound), no federation",
    )
    p.add_argument(
        "--backend",
        choices=["in-process", "flower"],
        help="in-process batched engine (default) or Flower's simulation engine",
    )
    p.add_argument("--nodes", type=int, help="simulated Flower nodes, each hosting a partition of the users")
    p.add_argument("--out", help="output folder for results.json")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run whose checkpoint --out holds (a killed run), bit for bit",
    )
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that already holds a run")
    p.add_argument("--no-progress", action="store_true", help="log a line per round instead of a progress bar")
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the popularity and centralised-bound (cached) test rows after a federated run",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tune", help="search learning rates, local epochs and plug-in knobs on validation (Optuna)")
    common(p)
    p.add_argument("--model", choices=["fcf", "fedncf", "pfedrec", "fedrap"], help="the federated base model to tune")
    p.add_argument("--plugin", choices=["none", "gfmfr"], help="plug-in whose knobs are searched too")
    p.add_argument("--wrapper", choices=["none", "mmx", "fedvlr"], help="model wrapper whose knobs are searched too")
    p.add_argument("--space", help="TOML file declaring the search space (default: see gfmfr.tune.default_space)")
    p.add_argument("--trials", type=int, default=50, help="most trials")
    p.add_argument("--budget", type=float, default=3600, help="wall-time budget in seconds")
    p.add_argument("--out", required=True, help="folder for best.toml and trials.csv")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("compare", help="run every method x seed of a plan and write a report (resumable)")
    p.add_argument("--config", required=True, help="plan TOML (see gfmfr.compare)")
    p.add_argument("--out", required=True, help="report folder; finished runs in it are reused")
    p.add_argument("--report-only", action="store_true", help="render the report from the runs already there")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each a child process with one thread")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("recommend", help="top-K items for a user of a trained run (its saved model)")
    p.add_argument("--run", required=True, help="the run's --out folder (it holds model/)")
    p.add_argument("--user", help="original user id")
    p.add_argument("--all-users", action="store_true", help="every user's top-K, as CSV to --out")
    p.add_argument("-k", type=int, default=10, help="items per user")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.add_argument("--out", help="CSV file for --all-users")
    p.add_argument(
        "--new-items",
        metavar="ITEMS_CSV",
        help="items.csv of new items (item_id, text, image): encoded on the server and ranked with the "
        "known items from their content alone (GFMFR or MM-X runs)",
    )
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser(
        "node-worker",
        help="run a deployed SuperNode's ClientApp tasks in one long-lived process (--isolation process)",
    )
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's --clientappio-api-address")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (same machine)")
    p.add_argument("--root-certificates", help="PEM file of the CA that signed the SuperNode's Runtime API")
    p.set_defaults(func=cmd_node_worker)

    p = sub.add_parser("encode", help="encode item text and images on the server (cached)")
    common(p, split=False, training=False)
    p.add_argument("--modality", action="append", choices=["text", "image"], default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_encode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "modality", None) is None and args.command == "encode":
        args.modality = ["text", "image"]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError) as exc:
        if args.verbose:
            log.exception("user error")
        sys.stderr.write(f"gfmfr: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
