"""``gfmfr tune``: seeded Optuna search of a run's hyperparameters on validation only.

A user's data is not ML-100K, and learning rates do not transfer. Each trial is one federated
run of the base configuration with the trial's values set, reporting its validation score
after every validation; Optuna's median pruner stops trials whose curve falls below the median
of earlier trials at the same round. Trials are sampled by TPE seeded with the run seed, so
the same command proposes the same values. The search stops at ``--trials`` trials or at the
wall-time budget, whichever comes first (a trial still running at the budget is stopped and
counted as pruned). The test split is never evaluated.

Outputs, in ``--out``: ``best.toml``, the base configuration with the best trial's values, which
``gfmfr run --config`` accepts; ``trials.csv``, one row per trial (values, state, best round,
validation score, seconds).

The search space is declared: by default it spans the model's learning rates (log scale, a
decade either side of the model's default), local epochs, weight decay and the knobs of the
plug-in in use (:func:`default_space`); a TOML file (``--space``) declares another, one table per
config key::

    ["model.lr"]
    type = "log"      # log | float | int | choice
    low = 0.1
    high = 10.0
    ["federation.local_epochs"]
    type = "int"
    low = 1
    high = 3
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import optuna

from gfmfr.build import build_run_model
from gfmfr.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    from_dict,
    load_toml,
    to_toml,
)
from gfmfr.data.dataset import load_dataset
from gfmfr.federation.engine import Federation
from gfmfr.models import FEDERATED_MODELS
from gfmfr.runtime import use_threads

log = logging.getLogger(__name__)

KINDS = ("log", "float", "int", "choice")


@dataclass(frozen=True)
class Dimension:
    """One searched config key."""

    key: str
    """Dotted config key, e.g. ``model.lr``."""
    kind: str
    """``log`` (log-uniform float), ``float``, ``int`` or ``choice``."""
    low: float | None = None
    """Lower bound (log, float, int)."""
    high: float | None = None
    """Upper bound, inclusive (log, float, int)."""
    choices: tuple[Any, ...] = ()
    """Values of a ``choice`` dimension."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"tune space {self.key}: type must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice":
            if not self.choices:
                raise ConfigError(f"tune space {self.key}: a choice needs a non-empty 'choices' list")
        elif self.low is None or self.high is None or not self.low <= self.high:
            raise ConfigError(f"tune space {self.key}: needs low <= high, got low={self.low}, high={self.high}")
        elif self.kind == "log" and self.low <= 0:
            raise ConfigError(f"tune space {self.key}: a log dimension needs low > 0, got {self.low}")

    def suggest(self, trial: Any) -> Any:
        if self.kind == "log":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(cast(float, self.low)), int(cast(float, self.high)))
        return trial.suggest_categorical(self.key, list(self.choices))


def default_space(cfg: RunConfig) -> list[Dimension]:
    """Learning rates (a decade around the model's defaults), local epochs, weight decay, and the
    plug-in's knobs (GFMFR's content prior kappa over two decades: how far content should pull the
    item rows depends most on the data)."""

    try:
        lrs = FEDERATED_MODELS[cfg.model.name].default_lrs
    except KeyError:
        raise ConfigError(f"gfmfr tune trains a federated model, not {cfg.model.name!r}") from None
    # a rate whose default is 0 (FedRAP's D_u) stays off: a log scale has no decade around it
    space = [Dimension(f"model.{k}", "log", v / 10, v * 10) for k, v in lrs.items() if v > 0]
    space += [Dimension("federation.local_epochs", "int", 1, 5), Dimension("model.weight_decay", "log", 1e-6, 1e-4)]
    if cfg.plugin == "gfmfr":
        space += [
            Dimension("gfmfr.groups", "int", 2, 10),
            Dimension("gfmfr.distill_on", "choice", choices=("all", "negatives")),
            Dimension("gfmfr.teacher_level", "choice", choices=("group", "client")),
            Dimension("gfmfr.server_every", "int", 1, 10),
            Dimension("gfmfr.content_prior", "log", 2.0, 200.0),
        ]
    if cfg.wrapper != "none":
        space += [Dimension("multimodal.content_lr", "log", 1e-3, 1e-1)]
        if cfg.wrapper == "fedvlr":
            space += [Dimension("multimodal.router_lr", "log", 1e-2, 1.0)]
    return space


def load_space(path: str | Path) -> list[Dimension]:
    """A search space from a TOML file: one table per dotted config key (see the module docstring)."""
    values = load_toml(path)
    space = []
    for key, spec in values.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: [{key!r}] must be a table with 'type' and bounds or 'choices'")
        unknown = set(spec) - {"type", "low", "high", "choices"}
        if unknown:
            raise ConfigError(f"{path}: [{key!r}] has unknown field(s) {sorted(unknown)}")
        if "type" not in spec:
            raise ConfigError(f"{path}: [{key!r}] needs a 'type' ({', '.join(KINDS)})")
        try:
            space.append(
                Dimension(key, spec["type"], spec.get("low"), spec.get("high"), tuple(spec.get("choices", ())))
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if not space:
        raise ConfigError(f"{path}: the search space declares no key")
    return space


class _OutOfTime(Exception):
    """The wall-time budget ran out while a trial was training."""


def tune(
    base: dict[str, Any],
    out: str | Path,
    space: list[Dimension] | None = None,
    trials: int = 50,
    budget_s: float = 3600.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Search ``space`` around the base config (nested dicts); write ``best.toml`` and ``trials.csv``
    into ``out``; return the best trial's values and validation score."""

    cfg = from_dict(base)
    if cfg.training != "federated":
        raise ConfigError("gfmfr tune searches federated runs (training = 'federated')")
    space = space if space is not None else default_space(cfg)
    for dim in space:  # every key must exist and every bound must parse as its field
        for value in (dim.low, dim.high, *dim.choices):
            if value is not None:
                from_dict(apply_overrides(base, [f"{dim.key}={value}"]), where=f"tune space {dim.key}")
    use_threads(cfg.runtime.threads)
    dataset = load_dataset(cfg.data)
    deadline = time.monotonic() + budget_s
    metric = cfg.eval.select_metric

    def objective(trial: optuna.Trial) -> float:
        values = {dim.key: dim.suggest(trial) for dim in space}
        trial_cfg = from_dict(apply_overrides(base, [f"{k}={v}" for k, v in values.items()]))
        model, plugins = build_run_model(dataset, trial_cfg)
        fed = Federation(dataset, model, trial_cfg, plugins)

        def report(round_: int, valid: dict[str, float]) -> None:
            trial.report(valid[metric], round_)
            if time.monotonic() > deadline:
                raise _OutOfTime
            if trial.should_prune():
                raise optuna.TrialPruned

        t0 = time.perf_counter()
        try:
            best = fed.fit(on_validation=report, evaluate_test=False, log_rounds=False)
        except _OutOfTime:
            trial.set_user_attr("stopped", "budget")
            raise optuna.TrialPruned from None
        except FloatingPointError as exc:  # a diverging learning rate is a bad trial, not a failed search
            trial.set_user_attr("stopped", str(exc))
            raise optuna.TrialPruned from None
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            trial.set_user_attr("rounds", len(fed.history))
        trial.set_user_attr("best_round", best["round"])
        log.info(
            "trial %d: validation %s %.4f at round %d with %s",
            trial.number,
            metric,
            best["score"],
            best["round"],
            values,
        )
        return float(best["score"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        # a slow learning rate starts low and ends high: no trial is judged before a tenth of the round
        # budget (with 10 rounds, the ML-100K run pruned 10 of 14 trials, some of them still climbing)
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(10, cfg.federation.rounds // 10)),
    )
    study.optimize(objective, n_trials=trials, timeout=budget_s, show_progress_bar=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = study.trials_dataframe()
    frame.to_csv(out / "trials.csv", index=False)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"no trial finished within the budget of {budget_s:.0f} s; raise --budget")
    best = study.best_trial
    best_cfg = from_dict(apply_overrides(base, [f"{k}={v}" for k, v in best.params.items()]))
    body = to_toml(best_cfg)
    header = (
        f"# gfmfr tune: best of {len(complete)} finished trials ({len(study.trials)} started), "
        f"validation {metric} {best.value:.4f} at round {best.user_attrs.get('best_round')}\n"
    )
    (out / "best.toml").write_text(header + body)
    log.info("best trial %d: validation %s %.4f with %s", best.number, metric, best.value, best.params)
    return {"params": best.params, "value": best.value, "trials": len(study.trials), "complete": len(complete)}
