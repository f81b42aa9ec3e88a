"""End-to-end smoke tests of the command line on a synthetic data folder."""

import json

import pytest

from gfmfr.cli import main


def test_data_report_json(planted_folder, capsys):
    assert main(["data", "--dataset", str(planted_folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("users", "items", "interactions", "train", "valid", "test", "dropped"):
        assert key in report
    assert report["users"] == 80 and report["train"] + report["valid"] + report["test"] == report["interactions"]


@pytest.mark.parametrize("model", ["popularity", "random", "fcf", "fedrap"])
def test_run_writes_results(planted_folder, tmp_path, capsys, model):
    out = tmp_path / "out"
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nrounds = 3\nlocal_epochs = 1\nbatch_size = 32\n[model]\ndim = 8\n")
    assert (
        main(
            [
                "run",
                "--dataset",
                str(planted_folder),
                "--model",
                model,
                "--out",
                str(out),
                "--config",
                str(cfg),
                "--seed",
                "2",
                "--set",
                "eval.ks=5,10",
                "--no-reference",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["seed"] == 2 and res["config"]["model"]["name"] == model
    overall = {f"{m}@{k}" for m in ("HR", "NDCG", "Recall", "MRR") for k in (5, 10)} | {"MRR"}
    assert {k for k in res["test"] if not k.startswith("tail ")} == overall
    assert res["best_round"] >= 0 and res["history"] and res["peak_rss_mb"] > 0 and res["seconds_per_round"] >= 0
    if model == "fedrap":
        assert len(res["history"]) == 3
        assert {"loss", "seconds", "bytes_up_per_client", "valid"} <= set(res["history"][0])
    assert "HR@10" in capsys.readouterr().out


def test_bad_input_exits_with_named_error(tmp_path, capsys):
    (tmp_path / "interactions.csv").write_text("user_id,item\n1,2\n")
    assert main(["data", "--dataset", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gfmfr: error: ") and "interactions.csv, line 1, field 'item_id'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["run", "--dataset", str(tmp_path), "--set", "model.nope=1"]) == 2
    # a value that cannot train is refused at load, naming the key
    assert main(["run", "--dataset", str(tmp_path), "-v", "--set", "model.lr=-1"]) == 2
    assert "model.lr: must be above 0" in capsys.readouterr().err


def test_usual_manners(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("gfmfr ")
    with pytest.raises(SystemExit) as exit_:
        main(["data", "--seed", "3"])  # data trains nothing: no seed
    assert exit_.value.code == 2


def test_run_centralised(planted_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "--dataset",
                str(planted_folder),
                "--model",
                "fcf",
                "--centralised",
                "--out",
                str(out),
                "--set",
                "centralised.epochs=2",
                "--set",
                "model.dim=8",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["training"] == "centralised" and len(res["history"]) == 2
    assert "fcf (centralised)" in capsys.readouterr().out


def test_run_states_where_it_stands_and_caches_the_bound(planted_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GFMFR_CACHE", str(tmp_path / "cache"))
    args = [
        "run",
        "--dataset",
        str(planted_folder),
        "--model",
        "pfedrec",
        "--no-progress",
        "--set",
        "federation.rounds=3",
        "--set",
        "centralised.epochs=2",
        "--set",
        "model.dim=8",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "x popularity" in out and "% of centralised FCF" in out
    bounds = list((tmp_path / "cache" / "bounds").glob("fcf-*.json"))
    assert len(bounds) == 1
    # a run that differs only in federated learning rates reuses the cached bound
    assert main(args + ["--set", "model.item_lr=50"]) == 0
    assert list((tmp_path / "cache" / "bounds").glob("fcf-*.json")) == bounds


def test_run_shows_a_progress_bar_with_the_validation_score(planted_folder, tmp_path, capsys):
    assert (
        main(
            [
                "run",
                "--dataset",
                str(planted_folder),
                "--model",
                "fcf",
                "--no-reference",
                "--set",
                "federation.rounds=3",
                "--set",
                "model.dim=8",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "rounds" in err and "3/3" in err and "valid NDCG@10" in err and "best" in err


def test_config_prints_the_resolved_config_that_run_reads_back(tmp_path, capsys):
    from gfmfr.config import RunConfig, from_dict, load_toml

    assert main(["config", "--model", "fcf", "--plugin", "gfmfr", "--set", "gfmfr.groups=3"]) == 0
    path = tmp_path / "resolved.toml"
    path.write_text(capsys.readouterr().out)
    cfg = from_dict(load_toml(path))
    assert cfg.model.name == "fcf" and cfg.plugin == "gfmfr" and cfg.gfmfr.groups == 3
    assert cfg.federation == RunConfig().federation  # every default written out
    assert main(["config", "--set", "gfmfr.fusion=nope"]) == 2


def test_node_worker_needs_a_transport(capsys):
    """``gfmfr node-worker`` says what to give when neither --insecure nor certificates are given."""
    assert main(["node-worker", "--runtime-api-address", "127.0.0.1:1"]) == 2
    assert "--insecure" in capsys.readouterr().err
