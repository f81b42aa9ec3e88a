"""``gfmfr compare``: every method x seed of a plan, one report.

A plan is a TOML file::

    seeds = [0, 1, 2]
    models = ["fcf", "fedrap"]                     # federated base models X
    variants = ["none", "mmx", "fedvlr", "gfmfr"]  # on every model: X, MM-X, FedVLR-X (wrappers), GFMFR-X (plug-in)
    centralised = ["fedrap"]                       # the centralised upper bound of these models
    baselines = ["popularity", "random"]

    [config]                                       # settings of every run (any RunConfig section)
    data.content = "../shared/datasets/ml-100k-content"
    federation.rounds = 30

    [[methods]]                                    # optional extra methods, each with its own settings
    label = "GFMFR-FedRAP (k-means)"
    set = { plugin = "gfmfr", "model.name" = "fedrap", "gfmfr.grouping" = "kmeans" }

Datasets are an axis of the plan: each ``[[datasets]]`` entry runs every method x seed once more with
its own settings on top of ``[config]``, in ``OUT/<dataset>/``, with a report of its own; ``OUT/report.md``
then holds one section per dataset::

    [[datasets]]
    label = "KU"
    set = { "data.dataset" = "../shared/datasets/ku" }
    seeds = [0, 1, 2, 3, 4]                        # optional: this dataset's own seeds

Each run writes ``OUT/runs/<method>/seed<k>/results.json``. A run whose results file exists
with the same resolved configuration is reused, so an interrupted comparison resumes where it
stopped. Paths in the plan are relative to the working directory, as on the command line.
The report (``OUT/report.md``, ``OUT/report.json`` and PNG plots) is rendered from the results
files alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gfmfr.coldstart import SOURCES, primary_source
from gfmfr.config import (
    SCORE_BASELINES,
    ConfigError,
    RunConfig,
    apply_overrides,
    bearing_dict,
    from_dict,
    from_stored,
    load_toml,
    same_rounds_under_caps,
    to_dict,
    to_toml,
)
from gfmfr.data.dataset import load_dataset
from gfmfr.federation.checkpoint import CHECKPOINT, matches
from gfmfr.results import resolved_settings
from gfmfr.run import run

log = logging.getLogger(__name__)

MODEL_LABELS = {
    "fcf": "FCF",
    "fedncf": "FedNCF",
    "pfedrec": "PFedRec",
    "fedrap": "FedRAP",
    "popularity": "Popularity",
    "content-knn": "Content kNN",
    "random": "Random",
}
VARIANTS = {
    "none": ("", {}),
    "mmx": ("MM-", {"wrapper": "mmx"}),
    "fedvlr": ("FedVLR-", {"wrapper": "fedvlr"}),
    "gfmfr": ("GFMFR-", {"plugin": "gfmfr"}),
}
"""A variant of every plan model X: its label prefix and settings."""
METRICS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50")
PLAN_KEYS = {"seeds", "models", "variants", "centralised", "baselines", "config", "methods", "datasets"}


@dataclass(frozen=True)
class Method:
    """One row of the report: a label and the settings that differ from the plan's ``[config]``."""

    label: str
    settings: dict[str, Any]
    kind: str = "federated"
    """``federated``, ``centralised`` or ``baseline``."""
    model: str = ""
    variant: str = "none"
    """``none`` for X itself (what the report pairs other methods with), else how it differs from X."""

    @property
    def slug(self) -> str:
        return slug(self.label)


def slug(label: str) -> str:
    """A label as a folder name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()


@dataclass(frozen=True)
class Plan:
    """What ``gfmfr compare`` runs."""

    seeds: tuple[int, ...]
    methods: tuple[Method, ...]
    config: dict[str, Any] = field(default_factory=dict)
    datasets: tuple[tuple[str, dict[str, Any], tuple[int, ...] | None], ...] = ()
    """The dataset axis: (label, settings over ``config``, its own seeds or None for the plan's) per
    dataset; empty: ``config``'s one dataset."""

    def per_dataset(self) -> list[tuple[str, Plan]]:
        """(label, plan of that dataset alone) per dataset of the axis; ``[("", self)]`` without one."""
        if not self.datasets:
            return [("", self)]
        return [
            (
                label,
                Plan(
                    seeds or self.seeds,
                    self.methods,
                    apply_overrides(self.config, [f"{k}={v}" for k, v in _flatten(settings).items()]),
                ),
            )
            for label, settings, seeds in self.datasets
        ]

    def run_config(self, method: Method, seed: int) -> RunConfig:
        values = apply_overrides(self.config, [f"{k}={v}" for k, v in _flatten(method.settings).items()])
        values["seed"] = seed
        return from_dict(values, where=f"method {method.label!r}")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan; every run's configuration is built once here, so errors come early."""
    raw = load_toml(path)
    unknown = sorted(set(raw) - PLAN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(PLAN_KEYS)}")
    seeds = tuple(int(s) for s in raw.get("seeds", [0]))
    methods: list[Method] = []
    for name in raw.get("baselines", []):
        methods.append(Method(MODEL_LABELS.get(name, name), {"model": {"name": name}}, "baseline", name))
    for model in raw.get("centralised", []):
        methods.append(
            Method(
                f"{MODEL_LABELS.get(model, model)} (centralised)",
                {"model": {"name": model}, "training": "centralised"},
                "centralised",
                model,
            )
        )
    for model in raw.get("models", []):
        for variant in raw.get("variants", ["none"]):
            if variant not in VARIANTS:
                raise ConfigError(f"{path}: variants: unknown {variant!r}; choose from {sorted(VARIANTS)}")
            prefix, settings = VARIANTS[variant]
            methods.append(
                Method(
                    prefix + MODEL_LABELS.get(model, model),
                    {"model": {"name": model}, **settings},
                    "federated",
                    model,
                    variant,
                )
            )
    for i, extra in enumerate(raw.get("methods", [])):
        if "label" not in extra or not isinstance(extra.get("set", {}), dict):
            raise ConfigError(f"{path}: methods[{i}] needs a label and a 'set' table")
        settings = apply_overrides({}, [f"{k}={v}" for k, v in _flatten(extra.get("set", {})).items()])
        planned: dict[str, Any] = raw.get("config", {}).get("model", {})
        own = cast(dict[str, Any], settings.get("model", {}))
        model = own.get("name", planned.get("name", ""))
        kind = "centralised" if settings.get("training") == "centralised" else "federated"
        kind = "baseline" if model in SCORE_BASELINES else kind
        plain = all(settings.get(k, "none") in ("none", None) for k in ("plugin", "wrapper"))
        methods.append(Method(extra["label"], settings, kind, model, "none" if plain else "other"))
    labels = [m.label for m in methods]
    if len(set(m.slug for m in methods)) != len(methods):
        raise ConfigError(f"{path}: method labels must be distinct: {labels}")
    if not methods:
        raise ConfigError(f"{path}: the plan has no methods (give models, baselines, centralised or methods)")
    datasets: list[tuple[str, dict[str, Any], tuple[int, ...] | None]] = []
    for i, entry in enumerate(raw.get("datasets", [])):
        if "label" not in entry or not isinstance(entry.get("set"), dict):
            raise ConfigError(f"{path}: datasets[{i}] needs a label and a 'set' table")
        unknown = sorted(set(entry) - {"label", "set", "seeds"})
        if unknown:
            raise ConfigError(f"{path}: datasets[{i}]: unknown key(s) {unknown}; known: ['label', 'seeds', 'set']")
        seeds_of = tuple(int(s) for s in entry["seeds"]) if "seeds" in entry else None
        if seeds_of == ():
            raise ConfigError(f"{path}: datasets[{i}]: seeds is empty")
        datasets.append((str(entry["label"]), entry["set"], seeds_of))
    if len({slug(entry[0]) for entry in datasets}) != len(datasets):
        raise ConfigError(f"{path}: dataset labels must be distinct: {[entry[0] for entry in datasets]}")
    plan = Plan(seeds, tuple(methods), raw.get("config", {}), tuple(datasets))
    for _, one in plan.per_dataset():
        for method in methods:
            one.run_config(method, one.seeds[0])
    return plan


def run_path(out: Path, method: Method, seed: int) -> Path:
    return out / "runs" / method.slug / f"seed{seed}" / "results.json"


def finished(path: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The stored results of ``cfg`` if that configuration already ran (:func:`differing_settings`
    finds nothing), else None."""
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    if differing_settings(results, cfg):
        log.info("%s ran with another configuration; running it again", path)
        return None
    return results


def differing_settings(results: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The settings on which a stored run's configuration differs from ``cfg``; [] when it is ``cfg``'s
    run. Compared: the sections the run reads (:func:`gfmfr.config.bearing_dict`, as ``section.key``),
    read through the current schema (a field added since takes its default), and the defaults the
    config leaves to the code (``resolved.lr``, ...: a model's default learning rate changed)."""
    try:
        stored_cfg = from_stored(results.get("config", {}))
    except ConfigError:
        return ["config"]
    stored = _flatten(bearing_dict(stored_cfg))
    wanted = _flatten(bearing_dict(cfg))
    if "resolved" in results:
        stored |= _flatten(results["resolved"], "resolved.")
        wanted |= _flatten(resolved_settings(cfg), "resolved.")
    differing = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    ran = len(results.get("history", []))
    if (
        differing == ["federation.rounds"]
        and ran < stored_cfg.federation.rounds
        and same_rounds_under_caps(stored_cfg, cfg, ran)
    ):
        return []  # early stopping ended it before either cap, which bore on no round: cfg's run
    return differing


def _clear_stale(folder: Path, cfg: RunConfig) -> None:
    """Before (re)running ``cfg`` in ``folder``: drop a checkpoint of another configuration (an
    interrupted run of another plan) and results that :func:`finished` found of another one; a
    checkpoint of ``cfg`` stays, for the run to resume from."""

    if (folder / CHECKPOINT).exists() and not matches(folder / CHECKPOINT, cfg):
        (folder / CHECKPOINT).unlink()
    (folder / "results.json").unlink(missing_ok=True)


class Children:
    """The ``gfmfr run`` processes of a comparison with ``jobs > 1``, ended when it ends: a comparison
    stopped by Ctrl-C, SIGTERM or an error leaves no run behind it (each keeps its checkpoint, and the
    next ``gfmfr compare`` resumes it)."""

    def __init__(self) -> None:
        self.live: set[subprocess.Popen[str]] = set()
        self.lock = threading.Lock()
        self.ending = False

    def run(self, cfg: RunConfig, folder: Path) -> str | None:
        """``gfmfr run`` of ``cfg`` in a child process with one thread; None, or the error it ended with."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(
            to_toml(dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, threads=1)))
        )
        _clear_stale(folder, cfg)
        command = [sys.executable, "-m", "gfmfr.cli", "run", "--config", str(folder / "config.toml")]
        command += ["--out", str(folder), "--no-progress", "--no-reference", "--resume"]
        with self.lock:
            if self.ending:
                return "the comparison is ending"
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            self.live.add(proc)
        try:
            _, stderr = proc.communicate()
        finally:
            with self.lock:
                self.live.discard(proc)
        if proc.returncode == 0:
            return None
        lines = stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {proc.returncode}"

    def end(self) -> None:
        """Start no more runs; end the ones running (SIGTERM, then SIGKILL after 30 s)."""
        with self.lock:
            self.ending = True
            procs = list(self.live)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def compare(plan: Plan, out: str | Path, progress: bool = True, jobs: int = 1) -> Path:
    """Run (or reuse) every method x seed of ``plan``, then render the report; returns ``report.md``.

    ``jobs > 1`` runs that many at once, each a ``gfmfr run`` child process with one thread (on a
    small machine, two one-thread runs finish sooner than two runs one after the other)."""

    out = Path(out)
    todo = []
    for label, one in plan.per_dataset():
        for method in one.methods:
            for seed in one.seeds:
                cfg, path = one.run_config(method, seed), run_path(out / slug(label), method, seed)
                if finished(path, cfg) is None and finished(path.with_name("failed.json"), cfg) is None:
                    todo.append((method, seed, cfg, path))

    def failed(method: Method, seed: int, cfg: RunConfig, path: Path, error: str) -> None:
        # a diverged run is a result too; the others go on
        log.warning("%s seed %d failed: %s", method.label, seed, error)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name("failed.json").write_text(json.dumps({"config": to_dict(cfg), "error": error}))

    with logging_redirect_tqdm(), tqdm(total=len(todo), disable=not progress, unit="run") as bar:
        if jobs > 1:
            children = Children()
            # SIGTERM ends the comparison as Ctrl-C does, through the finally below
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
            pool = ThreadPoolExecutor(jobs)
            try:
                # a run another compare on the same folder finished meanwhile is not run again
                futures = {
                    pool.submit(lambda c, p: None if finished(p, c) else children.run(c, p.parent), cfg, path): (
                        m,
                        s,
                        cfg,
                        path,
                    )
                    for m, s, cfg, path in todo
                }
                for future in as_completed(futures):
                    error = future.result()
                    if error is not None and error.startswith("FloatingPointError"):
                        failed(*futures[future], error)
                    elif error is not None:
                        method, seed = futures[future][:2]
                        raise RuntimeError(f"{method.label} seed {seed}: {error}")
                    bar.update(1)
            finally:
                children.end()
                pool.shutdown(wait=True, cancel_futures=True)
                if main_thread:
                    signal.signal(signal.SIGTERM, previous)
        else:
            datasets: dict[str, Any] = {}
            for method, seed, cfg, path in todo:
                bar.set_description(f"{method.label} seed {seed}")
                if finished(path, cfg) is not None:
                    bar.update(1)
                    continue
                key = json.dumps(to_dict(cfg)["data"], sort_keys=True)
                if key not in datasets:
                    datasets[key] = load_dataset(cfg.data)
                _clear_stale(path.parent, cfg)
                try:
                    run(cfg, path.parent, dataset=datasets[key], resume=True)
                except FloatingPointError as exc:
                    failed(method, seed, cfg, path, str(exc))
                bar.update(1)
    return render_report(plan, out)


# ---- the report --------------------------------------------------------------------------------
def collect(plan: Plan, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Results per method label, one per seed that has finished."""
    results: dict[str, list[dict[str, Any]]] = {}
    for method in plan.methods:
        runs = []
        for seed in plan.seeds:
            path = run_path(out, method, seed)
            if path.exists():
                runs.append(json.loads(path.read_text()))
        results[method.label] = runs
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise(plan: Plan, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean +- std of the test metrics, seconds per round and the gap figure."""
    table = {}
    for method in plan.methods:
        runs = results[method.label]
        if not runs:
            continue
        row = {"seeds": len(runs), "kind": method.kind}
        for metric in METRICS:
            row[metric] = mean_std([r["test"].get(metric, float("nan")) for r in runs])
            row[f"valid {metric}"] = mean_std([r["valid"].get(metric, float("nan")) for r in runs])
        row["seconds_per_round"] = mean_std([r["seconds_per_round"] for r in runs])
        row["best_round"] = mean_std([r["best_round"] for r in runs])
        spent = [r["history"][-1].get("epsilon") for r in runs if r.get("history")]
        if spent and all(e is not None for e in spent):  # under DP: the privacy each run spent
            row["epsilon"] = mean_std(spent)
        table[method.label] = row
    return {"table": table, "gaps": gaps(plan, results, table)}


def gap_closed(value: float, base: float, bound: float, noise: float = 0.0) -> float | None:
    """Share of the base-to-bound gap that ``value`` closes: 0 at the base, 1 at the bound, above 1
    past it. ``None`` when the bound does not lie above the base by more than ``noise`` (the bound's
    seed std): a federated model that beats its bound would flip the sign, and one level with it
    would divide by noise (FCF 0.0638 against its bound's 0.0639 made a +0.0030 gain read +1910%)."""
    return (value - base) / (bound - base) if bound - base > noise else None


def gaps(plan: Plan, results: dict[str, list[dict[str, Any]]], table: dict[str, Any]) -> list[dict[str, Any]]:
    """Each federated method against its own base model (same model, no plug-in) and that model's
    centralised bound (centralised FCF where the plan has none for that model): paired test and
    valid NDCG@10 differences over the seeds both finished, the share of the bound reached, and
    the gap closed."""
    base_of = {
        m.model: m.label
        for m in plan.methods
        if m.kind == "federated"
        and m.variant == "none"
        and m.settings in ({"model": {"name": m.model}}, {"model": {"name": m.model}, "plugin": "none"})
    }
    bound_of = {m.model: m.label for m in plan.methods if m.kind == "centralised" and m.variant == "none"}
    popularity = next((m.label for m in plan.methods if m.kind == "baseline" and m.model == "popularity"), None)
    out = []
    for m in plan.methods:
        if m.kind != "federated" or m.label not in table:
            continue
        row: dict[str, Any] = {"method": m.label, "NDCG@10": table[m.label]["NDCG@10"][0]}
        if popularity in table:
            row["x_popularity"] = row["NDCG@10"] / table[popularity]["NDCG@10"][0]
        base = base_of.get(m.model)
        if base in table and base != m.label:
            by_seed = {r["config"]["seed"]: r for r in results[base]}
            pairs = [(r, by_seed[r["config"]["seed"]]) for r in results[m.label] if r["config"]["seed"] in by_seed]
            row.update({"base": base, "base NDCG@10": table[base]["NDCG@10"][0], "paired seeds": len(pairs)})
            for split in ("test", "valid"):
                diffs = [a[split]["NDCG@10"] - b[split]["NDCG@10"] for a, b in pairs]
                row[f"paired {split} diff"] = mean_std(diffs) if diffs else (float("nan"), 0.0)
                row[f"paired {split} diffs"] = diffs
            tail = [
                a["test"]["tail MRR"] - b["test"]["tail MRR"]
                for a, b in pairs
                if "tail MRR" in a["test"] and "tail MRR" in b["test"]
            ]
            if tail:  # users whose test item is long-tail (eval.tail_max_count)
                row["paired tail test diff"] = mean_std(tail)
        bound = bound_of.get(m.model, bound_of.get("fcf"))
        if bound in table:
            hi = table[bound]["NDCG@10"][0]
            row.update({"centralised": bound, "centralised NDCG@10": hi, "of_bound": row["NDCG@10"] / hi})
            if "base NDCG@10" in row:
                row["gap_closed"] = gap_closed(row["NDCG@10"], row["base NDCG@10"], hi, table[bound]["NDCG@10"][1])
        out.append(row)
    return out


COLD_LABELS = {
    "gfmfr": "GFMFR fused Q_g(i)",
    "mmx": "MM-X projection",
    "ifedrec": "IFedRec-style network",
    "knn": "content kNN",
    "random": "random vectors",
}
COLD_METRICS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50")


def cold_start(plan: Plan, results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """On the cold-items split: every item-vector source of every federated method, mean ± std over
    seeds of the test metrics among the cold items and (``all ...``) among all items. A method's own
    source (:func:`gfmfr.coldstart.primary_source`) selected its best round; the others were scored at
    that round. Content kNN and random vectors do not depend on the method: shown once per model."""

    rows, shown = [], set()
    for method in plan.methods:
        runs = [r for r in results[method.label] if r["config"]["data"].get("split") == "cold-items"]
        if method.kind != "federated" or not runs:
            continue
        own = primary_source(from_dict(runs[0]["config"]))
        for source in (own, *(s for s in SOURCES if s != own)):
            prefix = "" if source == own else f"{source} "
            if f"{prefix}NDCG@10" not in runs[0]["test"]:
                continue
            if source in ("knn", "random"):
                if (method.model, source) in shown:
                    continue
                shown.add((method.model, source))
            row: dict[str, Any] = {
                "method": method.label,
                "model": method.model,
                "source": source,
                "selects": source == own,
                "seeds": len(runs),
            }
            for protocol in ("", "all "):
                for metric in COLD_METRICS:
                    key = f"{prefix}{protocol}{metric}"
                    if key in runs[0]["test"]:
                        row[f"{protocol}{metric}"] = mean_std([r["test"][key] for r in runs])
            rows.append(row)
    return rows


def _fmt(cell: tuple[float, float]) -> str:
    return f"{cell[0]:.4f} ± {cell[1]:.4f}"


def render_report(plan: Plan, out: str | Path) -> Path:
    """Write ``report.md``, ``report.json`` and the plots from the finished runs: with a dataset axis, one
    report per dataset in its folder and, in ``out``, their sections one after the other."""
    out = Path(out)
    if not plan.datasets:
        return render_one_report(plan, out)
    lines = ["# Comparison report", "", "One section per dataset; each one's runs and plots are in its folder.", ""]
    summaries = {}
    for label, one in plan.per_dataset():
        folder = out / slug(label)
        folder.mkdir(parents=True, exist_ok=True)
        body = render_one_report(one, folder).read_text().splitlines()[1:]  # less its title
        lines += [f"## {label}", ""]
        for line in body:
            line = re.sub(r"\]\(([^)/]+\.png)\)", rf"]({slug(label)}/\1)", line)
            lines.append("#" + line if line.startswith("#") else line.replace("`runs/", f"`{slug(label)}/runs/"))
        summaries[label] = json.loads((folder / "report.json").read_text())
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"datasets": summaries}, indent=2))
    return out / "report.md"


def render_one_report(plan: Plan, out: Path) -> Path:
    """``render_report`` of a plan on one dataset."""
    results = collect(plan, out)
    summary = summarise(plan, results)
    plots = render_plots(plan, results, out)
    lines = [
        "# Comparison report",
        "",
        f"Seeds: {', '.join(map(str, plan.seeds))}. Test metrics at the best validation round "
        "(mean ± sample std over seeds); seconds per training round (per epoch for centralised runs).",
        "",
    ]
    private = any("epsilon" in row for row in summary["table"].values())
    header = ["method", "seeds", *METRICS, "s/round", "best round"] + (["epsilon spent"] if private else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in summary["table"].items():
        cells = [
            label,
            str(row["seeds"]),
            *(_fmt(row[m]) for m in METRICS),
            f"{row['seconds_per_round'][0]:.2f}",
            f"{row['best_round'][0]:.1f}",
        ]
        if private:
            cells.append(f"{row['epsilon'][0]:.3g}" if "epsilon" in row else "—")
        lines.append("| " + " | ".join(cells) + " |")
    failed = [
        f"{m.label} seed {s}"
        for m in plan.methods
        for s in plan.seeds
        if run_path(out, m, s).with_name("failed.json").exists() and not run_path(out, m, s).exists()
    ]
    if failed:
        lines += ["", f"Diverged (see failed.json, not in the means): {', '.join(failed)}."]
    missing = [m.label for m in plan.methods if len(results[m.label]) < len(plan.seeds)]
    if missing:
        lines += ["", f"Incomplete (fewer seeds than planned): {', '.join(missing)}."]
    stale: dict[str, list[str]] = {}  # a setting -> the runs made with another value than the plan's
    for m in plan.methods:
        for r in results[m.label]:
            for key in differing_settings(r, plan.run_config(m, r["config"]["seed"])):
                stale.setdefault(key, []).append(f"{m.label} seed {r['config']['seed']}")
    if stale:
        lines += [
            "",
            "Ran with another configuration than the plan's today (a default changed since, or the plan): "
            + "; ".join(
                f"{key} in {len(runs)} run(s) ({', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''})"
                for key, runs in sorted(stale.items())
            )
            + ".",
        ]
    if summary["gaps"]:
        lines += [
            "",
            "## Against the base model and the centralised bound",
            "",
            "Test NDCG@10 of each federated method and its multiple of popularity's; the paired difference with its "
            "base model (same "
            "model, no plug-in) over the seeds both finished, test and valid (mean ± std), and on test over "
            "the users whose test item is long-tail (eval.tail_max_count training interactions or fewer; "
            "MRR over the whole ranking, since few of them reach any top K); "
            "the share of "
            "the centralised bound reached (its model's, else centralised FCF's); and the share of the "
            "base-to-bound gap closed "
            '("—" where the bound is not above the base by more than its seed std).',
            "",
            "| method | NDCG@10 | x popularity | paired test diff | paired valid diff | paired long-tail test MRR diff "
            "| bound | of bound | gap closed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for g in summary["gaps"]:
            diff = {
                k: (f"{g[k][0]:+.4f} ± {g[k][1]:.4f}" if k in g else "—")
                for k in ("paired test diff", "paired valid diff", "paired tail test diff")
            }
            of = f"{g['of_bound']:.0%}" if "of_bound" in g else "—"
            closed = f"{g['gap_closed']:+.0%}" if g.get("gap_closed") is not None else "—"
            pop = f"{g['x_popularity']:.2f}" if "x_popularity" in g else "—"
            lines.append(
                f"| {g['method']} | {g['NDCG@10']:.4f} | {pop} | {diff['paired test diff']} | "
                f"{diff['paired valid diff']} | {diff['paired tail test diff']} | {g.get('centralised', '—')} | "
                f"{of} | {closed} |"
            )
    cold = cold_start(plan, results)
    summary["cold_start"] = cold
    if cold:
        lines += [
            "",
            "## Cold-start items",
            "",
            "Test metrics of the held-out cold items (data.cold_item_fraction of the items; no client ever saw "
            "them), ranked among the cold items and, in the last two columns, among all items (a source "
            "without item vectors ranks the cold items only). Each source's vectors are scored with the "
            "user's own head. The source marked * selected its run's best round on validation; the others "
            "are scored at that round.",
            "",
            "| method | source | seeds | " + " | ".join(COLD_METRICS) + " | all NDCG@10 | all HR@50 |",
            "|" + "---|" * (len(COLD_METRICS) + 5),
        ]
        for row in cold:
            cells = [_fmt(row[m]) if m in row else "—" for m in (*COLD_METRICS, "all NDCG@10", "all HR@50")]
            lines.append(
                f"| {row['method']} | {COLD_LABELS[row['source']]}{' *' if row['selects'] else ''} | "
                f"{row['seeds']} | " + " | ".join(cells) + " |"
            )
        plots.update(render_cold_plot(cold, out))
    titles = {
        "convergence": "Validation NDCG@10 per round",
        "groups": "GFMFR client groups over rounds",
        "time": "Seconds per round",
        "cold_start": "Cold-item test NDCG@10 by source",
    }
    for key, name in plots.items():
        lines += ["", f"## {titles[key]}", "", f"![{titles[key]}]({name})"]
    lines += ["", "Runs: `runs/<method>/seed<k>/results.json` (configuration, per-round history, metrics)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"seeds": list(plan.seeds), **summary, "plots": plots}, indent=2))
    return out / "report.md"


def render_cold_plot(rows: list[dict[str, Any]], out: Path) -> dict[str, str]:
    """Cold-item test NDCG@10 of every source, grouped by base model, with the seed std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    labels = [f"{r['method']}: {COLD_LABELS[r['source']]}" for r in rows]
    ax.barh(
        labels,
        [r["NDCG@10"][0] for r in rows],
        xerr=[r["NDCG@10"][1] for r in rows],
        color=[f"C{sorted({r['model'] for r in rows}).index(r['model'])}" for r in rows],
    )
    ax.set_xlabel("test NDCG@10 among the cold items (mean ± std over seeds)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "cold_start.png", dpi=110)
    plt.close(fig)
    return {"cold_start": "cold_start.png"}


def render_plots(plan: Plan, results: dict[str, list[dict[str, Any]]], out: Path) -> dict[str, str]:
    """Convergence, GFMFR groups and time plots as PNG files; returns {plot: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    metric = "NDCG@10"

    # convergence: mean validation NDCG@10 per round over seeds; baselines as flat lines
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in plan.methods:
        runs = results[method.label]
        if not runs:
            continue
        curves = [[(h["round"], h["valid"][metric]) for h in r["history"] if h.get("valid")] for r in runs]
        if method.kind == "baseline":
            ax.axhline(np.mean([r["valid"][metric] for r in runs]), ls=":", lw=1, color="grey")
            ax.annotate(method.label, (0, np.mean([r["valid"][metric] for r in runs])), fontsize=7, color="grey")
            continue
        length = min(len(c) for c in curves)
        if length == 0:
            continue
        x = [p[0] for p in curves[0][:length]]
        y = np.mean([[p[1] for p in c[:length]] for c in curves], 0)
        ax.plot(x, y, label=method.label, ls="--" if method.kind == "centralised" else "-")
    ax.set_xlabel("round (epoch for centralised)")
    ax.set_ylabel(f"validation {metric}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=110)
    plt.close(fig)
    plots["convergence"] = "convergence.png"

    # groups: first seed of every GFMFR method, one panel per stored round
    grouped = [
        (m.label, results[m.label][0]["gfmfr_groups"])
        for m in plan.methods
        if results[m.label] and results[m.label][0].get("gfmfr_groups")
    ]
    if grouped:
        cols = max(len(snaps) for _, snaps in grouped)
        fig, axes = plt.subplots(len(grouped), cols, figsize=(2.6 * cols, 2.6 * len(grouped)), squeeze=False)
        for row, (label, snaps) in enumerate(grouped):
            for col in range(cols):
                ax = axes[row][col]
                ax.set_xticks([])
                ax.set_yticks([])
                if col >= len(snaps):
                    ax.axis("off")
                    continue
                xy = np.asarray(snaps[col]["xy"])
                ax.scatter(xy[:, 0], xy[:, 1], c=snaps[col]["group"], cmap="tab10", s=4, vmin=0, vmax=9)
                ax.set_title(textwrap.fill(f"{label}, round {snaps[col]['round']}", 32), fontsize=7)
        fig.suptitle("2-D PCA of the grouping signatures, coloured by group", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "groups.png", dpi=110)
        plt.close(fig)
        plots["groups"] = "groups.png"

    # time: mean seconds per round, split into phases
    timed = [(m.label, results[m.label]) for m in plan.methods if m.kind != "baseline" and results[m.label]]
    if timed:
        phases: list[str] = []
        means: dict[str, dict[str, float]] = {}
        for label, runs in timed:
            per: dict[str, list[float]] = {}
            for r in runs:
                for h in r["history"]:
                    for phase, sec in h["seconds"].items():
                        if phase != "evaluate":
                            per.setdefault(phase, []).append(sec)
            means[label] = {p: float(np.mean(v)) for p, v in per.items()}
            phases += [p for p in per if p not in phases]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(timed) + 1.5))
        left = np.zeros(len(timed))
        for phase in phases:
            widths = np.array([means[label].get(phase, 0.0) for label, _ in timed])
            ax.barh([label for label, _ in timed], widths, left=left, label=phase)
            left += widths
        ax.set_xlabel("seconds per round (mean over rounds and seeds)")
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "time.png", dpi=110)
        plt.close(fig)
        plots["time"] = "time.png"
    return plots
