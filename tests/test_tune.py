"""``gfmfr tune``: seeded search on validation only, a config ``gfmfr run`` accepts, a trials table."""

from __future__ import annotations

import pandas as pd
import pytest

from gfmfr.cli import main
from gfmfr.config import ConfigError, from_dict, load_toml
from gfmfr.eval.evaluator import Evaluator
from gfmfr.tune import Dimension, default_space, load_space

SPACE = """
["model.lr"]
type = "log"
low = 0.3
high = 10.0
["model.item_lr"]
type = "log"
low = 10.0
high = 300.0
["federation.num_negatives"]
type = "choice"
choices = [2, 4]
"""


def _tune(planted_folder, tmp_path, name, trials=4):
    (tmp_path / "space.toml").write_text(SPACE)
    out = tmp_path / name
    args = [
        "tune",
        "--dataset",
        str(planted_folder),
        "--model",
        "fcf",
        "--space",
        str(tmp_path / "space.toml"),
        "--trials",
        str(trials),
        "--budget",
        "600",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "federation.rounds=4",
        "--set",
        "federation.local_epochs=1",
        "--set",
        "model.dim=8",
    ]
    assert main(args) == 0
    return out


def test_tune_never_reads_test_and_writes_a_runnable_best_config(planted_folder, tmp_path, monkeypatch, capsys):
    real = Evaluator.evaluate

    def guarded(self, score, split):
        assert split != "test", "tune evaluated the test split"
        return real(self, score, split)

    monkeypatch.setattr(Evaluator, "evaluate", guarded)
    out = _tune(planted_folder, tmp_path, "a")
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and {"params_model.lr", "params_model.item_lr", "value", "state"} <= set(trials.columns)
    done = trials[trials.state == "COMPLETE"]
    best = done.loc[done.value.idxmax()]
    cfg = from_dict(load_toml(out / "best.toml"))
    assert cfg.model.lr == pytest.approx(best["params_model.lr"])
    assert cfg.model.item_lr == pytest.approx(best["params_model.item_lr"])
    assert cfg.federation.num_negatives == best["params_federation.num_negatives"]
    assert cfg.federation.rounds == 4 and cfg.model.dim == 8 and cfg.model.name == "fcf"
    monkeypatch.setattr(Evaluator, "evaluate", real)
    assert main(["run", "--config", str(out / "best.toml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0


def test_tune_is_seeded(planted_folder, tmp_path):
    a = pd.read_csv(_tune(planted_folder, tmp_path, "a", trials=3) / "trials.csv")
    b = pd.read_csv(_tune(planted_folder, tmp_path, "b", trials=3) / "trials.csv")
    assert a["params_model.lr"].tolist() == b["params_model.lr"].tolist()
    assert a["value"].tolist() == b["value"].tolist()


def test_space_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "space.toml"
    bad.write_text('["model.lr"]\ntype = "log"\nlow = 0\nhigh = 1\n')
    with pytest.raises(ConfigError, match=r"space.toml.*model.lr.*low > 0"):
        load_space(bad)
    bad.write_text('["model.lr"]\ntype = "gauss"\n')
    with pytest.raises(ConfigError, match="type must be one of"):
        load_space(bad)


def test_unknown_key_in_space_is_a_config_error(planted_folder, tmp_path):
    from gfmfr.tune import tune

    with pytest.raises(ConfigError, match="model"):
        tune(
            {"data": {"dataset": str(planted_folder)}, "model": {"name": "fcf"}},
            tmp_path,
            [Dimension("model.speed", "float", 0.0, 1.0)],
            trials=1,
        )


def test_default_space_covers_rates_epochs_decay_and_plugin_knobs():
    keys = {d.key for d in default_space(from_dict({"model": {"name": "fedrap"}, "plugin": "gfmfr"}))}
    assert {
        "model.lr",
        "model.item_lr",
        "federation.local_epochs",
        "model.weight_decay",
        "gfmfr.groups",
        "gfmfr.content_prior",
    } <= keys
    # a rate whose default is 0 has no log range around it: D_u held still is not searched
    keys = {d.key for d in default_space(from_dict({"model": {"name": "fedrap"}}))}
    assert "model.private_item_lr" in keys and "model.lr" in keys
    from gfmfr.models.fedrap import FedRAP

    still = {**FedRAP.default_lrs, "private_item_lr": 0.0}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FedRAP, "default_lrs", still)
        keys = {d.key for d in default_space(from_dict({"model": {"name": "fedrap"}}))}
    assert "model.private_item_lr" not in keys
