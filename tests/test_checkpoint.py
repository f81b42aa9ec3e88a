"""Resume after a crash: a killed run continued with --resume computes what the uninterrupted run
computes, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from tests.test_gfmfr import gfmfr_config, with_features
from tests.test_model_contract import small_config

from gfmfr.build import build_run_model
from gfmfr.federation import checkpoint as ckpt
from gfmfr.federation.checkpoint import CHECKPOINT
from gfmfr.federation.engine import Federation
from gfmfr.models import build_model


class Killed(Exception):
    pass


@pytest.fixture(autouse=True)
def every_checkpoint(monkeypatch):
    """A checkpoint after every round, however long it takes against these tiny rounds: the tests
    below resume from the round they stopped at."""
    monkeypatch.setattr(ckpt, "WRITE_SHARE", float("inf"))


def test_checkpoints_take_at_most_a_tenth_of_the_run(monkeypatch):
    monkeypatch.setattr(ckpt, "WRITE_SHARE", 0.1)
    assert ckpt.due(0, 1, False, writing=0.0, elapsed=0.01)  # the first is always written
    assert ckpt.due(4, 5, False, writing=1.0, elapsed=10.0)
    assert not ckpt.due(4, 5, False, writing=1.5, elapsed=10.0)  # writing has taken 15%: skip this one
    assert not ckpt.due(3, 5, False, writing=0.0, elapsed=10.0)  # not a 5th round
    assert ckpt.due(3, 5, True, writing=5.0, elapsed=10.0)  # the last round, whatever it costs
    assert not ckpt.due(0, 0, True, writing=0.0, elapsed=10.0)  # checkpoints off


def test_a_slow_checkpoint_is_written_less_often(planted, tmp_path, monkeypatch):
    """A checkpoint that takes far longer than a round to write is written about every tenth of the
    run's time, not every round, and the run still resumes from the latest one."""
    monkeypatch.setattr(ckpt, "WRITE_SHARE", 0.1)
    written = []
    save = ckpt.save

    def slow_save(fed, best, path):
        save(fed, best, path)
        written.append(len(fed.history))
        time.sleep(0.2)

    monkeypatch.setattr(ckpt, "save", slow_save)
    cfg = small_config("fcf", rounds=20)
    cfg = replace(cfg, federation=replace(cfg.federation, early_stop_patience=0))
    path = tmp_path / CHECKPOINT
    fed = Federation(planted, build_model(planted.n_items, cfg.model), cfg)
    fed.fit(checkpoint=path)
    assert written[0] == 1 and written[-1] == 20  # the first round's, and the last round's
    assert len(written) < 10


def same_history(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.round == y.round and x.loss == y.loss and x.valid == y.valid and x.rejected == y.rejected
        assert x.epsilon == y.epsilon
        assert x.extra == y.extra


@pytest.mark.parametrize(
    "name, plugin, dp",
    [
        ("fcf", "none", "off"),
        ("fedrap", "none", "off"),
        ("fedrap", "gfmfr", "off"),
        ("pfedrec", "gfmfr", "off"),
        ("fcf", "none", "local"),
        ("fcf", "gfmfr", "central"),
    ],
)
def test_a_run_stopped_after_any_round_resumes_bit_for_bit(planted, tmp_path, name, plugin, dp):
    data = with_features(planted)
    cfg = gfmfr_config(name, server_every=2) if plugin == "gfmfr" else small_config(name, rounds=6)
    cfg = replace(cfg, plugin=plugin, federation=replace(cfg.federation, rounds=6, client_fraction=0.6))
    if dp != "off":  # seeded noise and an accountant rebuilt from the rounds done
        cfg = replace(cfg, privacy=replace(cfg.privacy, mode=dp, noise_multiplier=0.5, clip=5.0, signature_noise=0.5))
    model, plugins = build_run_model(data, cfg)
    whole = Federation(data, model, cfg, plugins)
    expected = whole.fit()
    for stop_after in (0, 3):
        path = tmp_path / f"stop{stop_after}" / CHECKPOINT
        path.parent.mkdir()
        model, plugins = build_run_model(data, cfg)

        def kill(t, valid, stop_after=stop_after):
            if t == stop_after:
                raise Killed

        with pytest.raises(Killed):
            Federation(data, model, cfg, plugins).fit(checkpoint=path, on_validation=kill)
        model, plugins = build_run_model(data, cfg)  # a fresh process
        resumed = Federation(data, model, cfg, plugins)
        assert resumed.fit(checkpoint=path, resume=True) == expected
        same_history(resumed.history, whole.history)
        if plugins:
            assert plugins[0].server.summary() == whole.plugins[0].server.summary()


def test_a_checkpoint_of_another_configuration_is_refused(planted, tmp_path):
    from gfmfr.config import ConfigError

    cfg = small_config("fcf", rounds=2)
    path = tmp_path / CHECKPOINT
    Federation(planted, build_model(planted.n_items, cfg.model), cfg).fit(checkpoint=path)
    other = replace(cfg, federation=replace(cfg.federation, local_epochs=1))
    with pytest.raises(ConfigError, match="another configuration"):
        Federation(planted, build_model(planted.n_items, other.model), other).fit(checkpoint=path, resume=True)
    # a setting FCF never reads (FedRAP's lambda) is not another configuration of FCF's run
    from gfmfr.federation.checkpoint import matches

    assert matches(path, replace(cfg, model=replace(cfg.model, fedrap_lambda=0.5)))
    assert not matches(path, other)


@pytest.mark.parametrize("anneal", [4, None])
def test_an_interrupted_run_resumes_into_a_longer_round_cap(planted, tmp_path, anneal):
    """A run killed after 3 of its 5 rounds, resumed with a cap of 8, is the uninterrupted 8-round run,
    unless the cap bears on the rounds: GFMFR annealing over the cap (anneal_rounds None), or central DP."""
    from gfmfr.config import ConfigError

    data = with_features(planted)
    cfg = gfmfr_config("fcf", server_every=2, anneal_rounds=anneal)
    capped = replace(cfg, federation=replace(cfg.federation, rounds=5))
    longer = replace(cfg, federation=replace(cfg.federation, rounds=8))
    path = tmp_path / CHECKPOINT

    def kill(t, valid):
        if t == 2:
            raise Killed

    model, plugins = build_run_model(data, capped)
    with pytest.raises(Killed):
        Federation(data, model, capped, plugins).fit(checkpoint=path, on_validation=kill)
    model, plugins = build_run_model(data, longer)
    resumed = Federation(data, model, longer, plugins)
    if anneal is None:
        with pytest.raises(ConfigError, match="another configuration"):
            resumed.fit(checkpoint=path, resume=True)
        return
    summary = resumed.fit(checkpoint=path, resume=True)
    model, plugins = build_run_model(data, longer)
    whole = Federation(data, model, longer, plugins)
    assert summary == whole.fit()
    same_history(resumed.history, whole.history)
    shorter = replace(cfg, federation=replace(cfg.federation, rounds=2))  # the rounds done exceed its cap
    dp = replace(
        longer, privacy=replace(longer.privacy, mode="central", noise_multiplier=0.5, clip=5.0, signature_noise=0.5)
    )
    from gfmfr.federation.checkpoint import bearing, is_of

    assert is_of(bearing(capped), longer, 3) and not is_of(bearing(capped), shorter, 3)
    dp_capped = replace(dp, federation=replace(dp.federation, rounds=5))
    assert is_of(bearing(dp_capped), dp, 3) is False and is_of(bearing(dp), dp, 3)


@pytest.mark.slow
def test_kill_9_at_three_random_moments_then_resume(planted_folder, tmp_path):
    """`gfmfr run` killed with SIGKILL at 3 random moments (0-0.5 s after its first checkpoint) and
    continued with --resume each time: its results.json has the uninterrupted run's metrics at every
    round, bit for bit."""
    cmd = [
        sys.executable,
        "-m",
        "gfmfr.cli",
        "run",
        "--dataset",
        str(planted_folder),
        "--model",
        "fedrap",
        "--set",
        "federation.rounds=200",
        "--set",
        "model.dim=16",
        "--set",
        "eval.ks=10",
        "--set",
        "federation.early_stop_patience=0",
        "--threads",
        "1",
        "--no-progress",
        "--no-reference",
    ]
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], check=True, capture_output=True)
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):
        log = open(tmp_path / f"attempt{attempt}.log", "w")
        proc = subprocess.Popen(
            cmd + ["--out", str(out), "--resume"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        before = (out / CHECKPOINT).stat().st_mtime_ns if (out / CHECKPOINT).exists() else None
        deadline = time.monotonic() + 120
        while (
            proc.poll() is None
            and time.monotonic() < deadline
            and (not (out / CHECKPOINT).exists() or (out / CHECKPOINT).stat().st_mtime_ns == before)
        ):
            time.sleep(0.05)  # until this attempt has completed a round of its own
        # then a random moment (mid-round, mid-checkpoint, mid-evaluation) well within the run's
        # 200 rounds (about 1.5 s on a quiet machine)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        log.close()
    assert kills >= 1, (tmp_path / "attempt0.log").read_text()[-2000:]
    refused = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr.strip().splitlines()[-1]
    subprocess.run(cmd + ["--out", str(out), "--resume"], check=True, capture_output=True)
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert [(h["round"], h["loss"], h["valid"]) for h in a["history"]] == [
        (h["round"], h["loss"], h["valid"]) for h in b["history"]
    ]
    assert a["test"] == b["test"] and a["best_round"] == b["best_round"]
    assert not (out / CHECKPOINT).exists()
