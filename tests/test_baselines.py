"""The comparison baselines: MM-X and FedVLR wrappers, the centralised upper bound, `gfmfr compare`."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from gfmfr.build import build_run_model
from gfmfr.cli import main
from gfmfr.config import CentralisedConfig, MultimodalConfig
from gfmfr.federation.batched import train_clients
from gfmfr.federation.engine import Federation
from gfmfr.models import FEDERATED_MODELS, build_model
from gfmfr.models.wrappers import FedVLR, content_tables, wrap
from gfmfr.run import run
from test_gfmfr import with_features
from test_model_contract import assert_batched_equals_one_client_at_a_time, small_config

MODELS = sorted(FEDERATED_MODELS)
MM = MultimodalConfig(content_dim=8, content_lr=0.05, router_lr=0.05)


def wrapped(data, name, wrapper):
    cfg = replace(small_config(name), wrapper=wrapper, multimodal=MM)
    model, _ = build_run_model(data, cfg)
    return cfg, model


@pytest.mark.parametrize("wrapper", ["mmx", "fedvlr"])
@pytest.mark.parametrize("name", MODELS)
def test_wrapper_starts_as_the_base_model_and_keeps_content_frozen(planted, name, wrapper):
    data = with_features(planted)
    cfg, model = wrapped(data, name, wrapper)
    base = build_model(data.n_items, cfg.model)
    a, b = Federation(data, model, cfg), Federation(data, base, cfg)
    users = np.arange(9)
    # projections start at zero and the router at an even mixture: the wrapper scores as X does
    torch.testing.assert_close(a.state.score(users), b.state.score(users))
    content = {n: t.clone() for n, t in a.state.shared.items() if n.startswith("content.")}
    update = train_clients(model, a.state, np.arange(20), data, cfg.federation, 0, 0)
    uploaded = set(update.shared) | set(update.rows)
    assert uploaded == set(model.shared_names()) and not uploaded & set(content)
    assert not uploaded & set(model.private_names())
    assert model.upload_bytes() > base.upload_bytes()  # the projections travel; the content does not
    a.train_round(0)
    for n, t in content.items():
        assert torch.equal(a.state.shared[n], t)
    assert any(a.state.shared[n].abs().sum() > 0 for n in model.shared_names() if n.startswith("proj."))


@pytest.mark.parametrize("name", ["fcf", "fedrap"])
def test_fedvlr_router_is_private_and_personal(planted, name):
    data = with_features(planted)
    cfg, model = wrapped(data, name, "fedvlr")
    assert isinstance(model, FedVLR) and {"router.w", "router.b"} <= set(model.private_names())
    fed = Federation(data, model, cfg)
    for t in range(3):
        fed.train_round(t)
    w = fed.state.private["router.w"]
    assert w.abs().sum() > 0 and not torch.allclose(w[0], w[1])  # each client routes its own way
    p = fed.state.client_params(np.arange(4))
    items = {
        n: fed.state.shared[n][:5].expand(4, 5, *fed.state.shared[n].shape[1:])
        for n, s in model.param_specs().items()
        if s.item_table and s.shared
    }
    items.update(
        {n: torch.zeros(4, 5, *s.shape) for n, s in model.param_specs().items() if s.item_table and not s.shared}
    )
    mix = model.router_weights(
        p, model.view_vectors(p, items[model.item_table], [items[f"content.{m}"] for m in model.modalities])
    )
    torch.testing.assert_close(mix.sum(-1), torch.ones(4, 5))


@pytest.mark.parametrize("wrapper", ["mmx", "fedvlr"])
def test_wrapper_batched_equals_one_client_at_a_time(planted, wrapper):
    data = with_features(planted)
    cfg, model = wrapped(data, "fedrap", wrapper)
    assert_batched_equals_one_client_at_a_time(data, model, cfg)


def test_content_tables_errors_and_shape(planted):
    data = with_features(planted)
    tables = content_tables(
        data.item_features, {m: np.ones(data.n_items, bool) for m in data.item_features}, ("text", "image"), 8, 0
    )
    assert tables["text"].shape == (data.n_items, 8)
    torch.testing.assert_close(tables["image"].mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no item content.*--content DIR"):
        content_tables(data.item_features, {}, ("audio",), 8, 0)
    only_text = content_tables(
        {"text": data.item_features["text"]}, {"text": np.ones(data.n_items, bool)}, ("text", "image"), 8, 0
    )
    assert list(only_text) == ["text"]  # whichever modalities the data has
    with pytest.raises(ValueError, match="views"):
        wrap(build_model(data.n_items, small_config("fcf").model), "fedvlr", tables, replace(MM, views=("nope",)))


@pytest.mark.parametrize("name", MODELS)
def test_centralised_upper_bound_learns_and_beats_federation(planted, name):
    cfg = replace(
        small_config(name), training="centralised", centralised=CentralisedConfig(epochs=10, batch_size=64, lr=0.01)
    )
    central = run(cfg, dataset=planted)
    fed = run(small_config(name), dataset=planted)
    pop = run(replace(cfg, model=replace(cfg.model, name="popularity")), dataset=planted)
    losses = [h["loss"] for h in central["history"]]
    assert losses[-1] < losses[0]
    assert central["valid"]["HR@10"] > pop["valid"]["HR@10"] + 0.2
    assert central["valid"]["NDCG@10"] > fed["valid"]["NDCG@10"] - 0.05, (central["valid"], fed["valid"])
    again = run(cfg, dataset=planted)
    assert again["valid"] == central["valid"]


def test_centralised_rejects_gfmfr(planted):
    cfg = replace(small_config("fcf"), training="centralised", plugin="gfmfr")
    with pytest.raises(ValueError, match="federated method"):
        run(cfg, dataset=planted)


def fedvlr_folder(tmp_path, planted):
    """The planted federation in the FedVLR layout, with synthetic text and image features."""
    from conftest import planted_frame

    frame = planted_frame()
    inter = frame.rename(columns={"user_id": "userId", "item_id": "itemId"})
    inter["userId"] = inter["userId"].str[1:].astype(int)
    inter.to_csv(tmp_path / "inter.csv", index=False)
    feats = with_features(planted).item_features
    order = np.argsort([int(i) for i in planted.item_ids])  # rows follow itemId 0..n-1
    for m, x in feats.items():
        np.save(tmp_path / f"{m}_features.npy", x[order].astype(np.float32))
    return tmp_path


def test_compare_renders_a_complete_report_and_resumes(tmp_path, planted, capsys):
    (tmp_path / "data").mkdir()
    data = fedvlr_folder(tmp_path / "data", planted)
    plan = tmp_path / "plan.toml"
    plan.write_text(f"""
seeds = [0, 1]
models = ["fcf"]
variants = ["none", "mmx", "fedvlr", "gfmfr"]
centralised = ["fcf"]
baselines = ["popularity", "random"]

[config]
data.dataset = "{data}"
model = {{ dim = 8, lr = 0.5, item_lr = 5.0 }}
federation = {{ rounds = 3, local_epochs = 1, batch_size = 32 }}
eval.ks = [10, 50]
gfmfr = {{ groups = 3, server_steps = 5 }}
multimodal = {{ content_dim = 8, content_lr = 0.05 }}
centralised = {{ epochs = 3, batch_size = 128, lr = 0.01 }}

[[methods]]
label = "GFMFR-FCF k-means"
set = {{ plugin = "gfmfr", "model.name" = "fcf", "gfmfr.grouping" = "kmeans" }}

[[methods]]
label = "FCF, DP epsilon 50"
set = {{ "model.name" = "fcf", "privacy.mode" = "central", "privacy.target_epsilon" = 50 }}
""")
    out = tmp_path / "report"
    assert main(["compare", "--config", str(plan), "--out", str(out), "--no-progress"]) == 0
    text = (out / "report.md").read_text()
    labels = [
        "Popularity",
        "Random",
        "FCF",
        "MM-FCF",
        "FedVLR-FCF",
        "GFMFR-FCF",
        "FCF (centralised)",
        "GFMFR-FCF k-means",
        "FCF, DP epsilon 50",
    ]
    rows = [line for line in text.split("## Against")[0].splitlines() if line.startswith("| ") and "±" in line]
    assert sorted(r.split(" | ")[0][2:] for r in rows) == sorted(labels)
    assert all(r.split(" | ")[1] == "2" for r in rows)  # every method ran both seeds
    assert "Incomplete" not in text and "gap closed" in text and "another configuration" not in text
    for png in ("convergence.png", "groups.png", "time.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in text
    summary = json.loads((out / "report.json").read_text())
    assert summary["table"]["FCF"]["seeds"] == 2 and len(summary["gaps"]) == 6
    assert 0 < summary["table"]["FCF, DP epsilon 50"]["epsilon"][0] <= 50 and "epsilon" not in summary["table"]["FCF"]
    assert "epsilon spent" in text
    gfmfr_row = next(g for g in summary["gaps"] if g["method"] == "GFMFR-FCF")
    assert gfmfr_row["base"] == "FCF" and gfmfr_row["paired seeds"] == 2 and len(gfmfr_row["paired test diffs"]) == 2

    # a second run reuses every finished run; a run whose configuration changed runs again
    results = out / "runs" / "fcf" / "seed1" / "results.json"
    older = json.loads(results.read_text())
    del older["config"]["gfmfr"]["distill_on"]  # as written before that field existed: still the same run
    older["config"]["gfmfr"]["server_steps"] = 77  # a section plain FCF never reads: still the same run
    results.write_text(json.dumps(older))
    stamp = results.stat().st_mtime_ns
    grouped = out / "runs" / "gfmfr-fcf" / "seed0" / "results.json"
    changed = json.loads(grouped.read_text())
    changed["config"]["gfmfr"]["server_steps"] = 77  # the same change does bear on a GFMFR run
    grouped.write_text(json.dumps(changed))
    mm = out / "runs" / "mm-fcf" / "seed0" / "results.json"
    stale = json.loads(mm.read_text())
    stale["config"]["federation"]["local_epochs"] = 2
    mm.write_text(json.dumps(stale))
    lrs = out / "runs" / "fedvlr-fcf" / "seed1" / "results.json"
    # the report names the runs made with another configuration than the plan's, and on which setting
    assert main(["compare", "--config", str(plan), "--out", str(out), "--report-only"]) == 0
    note = next(line for line in (out / "report.md").read_text().splitlines() if "another configuration" in line)
    assert (
        "federation.local_epochs in 1 run(s) (MM-FCF seed 0)" in note
        and "gfmfr.server_steps in 1 run(s) (GFMFR-FCF seed 0)" in note
    )
    assert "FCF seed 1" not in note  # settings plain FCF never reads do not count
    moved = json.loads(lrs.read_text())
    moved["resolved"]["lr"] = 123.0  # as if the model's default learning rate had changed since: runs again
    lrs.write_text(json.dumps(moved))
    assert main(["compare", "--config", str(plan), "--out", str(out), "--report-only"]) == 0
    assert "resolved.lr in 1 run(s) (FedVLR-FCF seed 1)" in (out / "report.md").read_text()

    assert main(["compare", "--config", str(plan), "--out", str(out), "--no-progress"]) == 0
    assert results.stat().st_mtime_ns == stamp
    assert json.loads(lrs.read_text())["resolved"]["lr"] != 123.0
    assert json.loads(grouped.read_text())["config"]["gfmfr"]["server_steps"] == 5
    assert json.loads(mm.read_text())["config"]["federation"]["rounds"] == 3


def test_compare_plan_errors_name_the_file(tmp_path, capsys):
    plan = tmp_path / "plan.toml"
    plan.write_text('seeds = [0]\nmodels = ["fcf"]\nvariants = ["nope"]\n')
    assert main(["compare", "--config", str(plan), "--out", str(tmp_path / "r")]) == 2
    assert "plan.toml: variants: unknown 'nope'" in capsys.readouterr().err
    plan.write_text('seeds = [0]\nmodel = ["fcf"]\n')
    assert main(["compare", "--config", str(plan), "--out", str(tmp_path / "r")]) == 2
    assert "unknown key(s) ['model']" in capsys.readouterr().err
    plan.write_text('seeds = [0]\nmodels = ["fcf"]\n[config]\nfederation.rounds = "many"\n')
    assert main(["compare", "--config", str(plan), "--out", str(tmp_path / "r")]) == 2
    assert "federation.rounds: cannot read 'many'" in capsys.readouterr().err


def test_gap_closed_keeps_its_sign_when_the_bound_is_not_above_the_base():
    from gfmfr.compare import gap_closed

    assert gap_closed(0.06, 0.04, 0.08) == pytest.approx(0.5)
    assert gap_closed(0.03, 0.04, 0.08) == pytest.approx(-0.25)
    assert gap_closed(0.09, 0.04, 0.08) == pytest.approx(1.25)
    assert gap_closed(0.07, 0.06, 0.05) is None  # the federated base beats its bound: no gap to close
    assert gap_closed(0.0668, 0.0638, 0.0639, noise=0.0021) is None  # level within the bound's seed std
    assert gap_closed(0.0496, 0.0484, 0.0639, noise=0.0021) == pytest.approx(0.0012 / 0.0155)


def test_compare_jobs_run_in_child_processes_with_the_same_results(tmp_path, planted_folder):
    plan = tmp_path / "plan.toml"
    plan.write_text(f"""
seeds = [0, 1]
models = ["fcf"]
baselines = ["popularity"]
[config]
data.dataset = "{planted_folder}"
model = {{ dim = 8 }}
federation = {{ rounds = 3, local_epochs = 1, batch_size = 32 }}
""")
    for jobs, name in ((2, "a"), (1, "b")):
        assert (
            main(
                ["compare", "--config", str(plan), "--out", str(tmp_path / name), "--no-progress", "--jobs", str(jobs)]
            )
            == 0
        )
    for seed in (0, 1):
        a = json.loads((tmp_path / "a" / "runs" / "fcf" / f"seed{seed}" / "results.json").read_text())
        b = json.loads((tmp_path / "b" / "runs" / "fcf" / f"seed{seed}" / "results.json").read_text())
        assert a["config"]["runtime"]["threads"] == 1
        assert a["test"] == pytest.approx(b["test"], rel=1e-5) and a["best_round"] == b["best_round"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_compare_resumes_an_interrupted_run_from_its_checkpoint(tmp_path, planted_folder, caplog, jobs):
    """Killed mid-run, a comparison continues the run from its checkpoint, in-process or in a child."""
    from gfmfr.compare import load_plan, run_path
    from gfmfr.data.dataset import load_dataset
    from gfmfr.federation.checkpoint import CHECKPOINT

    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(f"""
seeds = [0]
models = ["fcf"]
[config]
data.dataset = "{planted_folder}"
model = {{ dim = 8 }}
federation = {{ rounds = 4, local_epochs = 1, batch_size = 32 }}
""")
    out = tmp_path / "report"
    assert main(["compare", "--config", str(plan_path), "--out", str(out), "--no-progress"]) == 0
    plan = load_plan(plan_path)
    results = run_path(out, plan.methods[0], 0)
    whole = json.loads(results.read_text())
    cfg = plan.run_config(plan.methods[0], 0)
    data = load_dataset(cfg.data)
    fed = Federation(data, build_model(data.n_items, cfg.model), cfg)
    fed.fit(checkpoint=results.parent / CHECKPOINT)  # every round done, as if killed before the results
    results.unlink()
    caplog.set_level("INFO")
    assert main(["compare", "--config", str(plan_path), "--out", str(out), "--no-progress", "--jobs", str(jobs)]) == 0
    again = json.loads(results.read_text())
    assert again["test"] == pytest.approx(whole["test"], rel=1e-6) and again["best_round"] == whole["best_round"]
    if jobs == 1:  # a child's log is its own
        assert "resuming after round 3" in caplog.text
    # the rounds come from the checkpoint (their timings are those of the fit above), none ran again
    assert [h["seconds"] for h in again["history"]] == [h.seconds for h in fed.history]


@pytest.mark.parametrize("wrapper", ["mmx", "fedvlr"])
@pytest.mark.parametrize("name", ["fcf", "fedrap"])
def test_scoring_with_broadcast_tables_computes_the_content_vectors_once(planted, name, wrapper):
    """Scoring passes one table and one set of shared parameters broadcast to every client; the
    wrapper then builds each item's content vectors once. Same scores as the per-client path."""
    data = with_features(planted)
    cfg, model = wrapped(data, name, wrapper)
    fed = Federation(data, model, cfg)
    for t in range(2):
        fed.train_round(t)
    users = np.arange(12)
    p = fed.state.client_params(users)
    items = {
        n: fed.state.shared[n].expand(len(users), *fed.state.shared[n].shape)
        for n, s in model.param_specs().items()
        if s.item_table and s.shared
    }
    items.update(
        {
            n: fed.state.private_rows[n].dense(users)
            for n, s in model.param_specs().items()
            if s.item_table and not s.shared
        }
    )
    fast = model.forward(p, items)
    copies = lambda d: {n: t.contiguous().clone() for n, t in d.items()}  # noqa: E731 - no stride-0 rows
    torch.testing.assert_close(fast, model.forward(copies(p), copies(items)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, fed.state.score(users))


def test_a_run_early_stopping_ended_is_the_run_any_longer_round_cap_makes():
    """The plan's round cap rose (a slow base model needs more rounds): stored runs that stopped early
    before either cap are reused, a run that reached its cap or ran under DP is not."""
    from gfmfr.compare import differing_settings
    from gfmfr.config import from_dict, to_dict

    def stored(values, ran):
        return {"config": to_dict(from_dict(values)), "history": [{}] * ran}

    fcf = {"model": {"name": "fcf"}, "federation": {"rounds": 400}}
    longer = from_dict({"model": {"name": "fcf"}, "federation": {"rounds": 1000}})
    assert differing_settings(stored(fcf, 210), longer) == []
    assert differing_settings(stored(fcf, 400), longer) == ["federation.rounds"]
    assert differing_settings(stored(fcf, 210), from_dict({**fcf, "federation": {"rounds": 200}})) == [
        "federation.rounds"
    ]
    dp = {"privacy": {"mode": "central", "noise_multiplier": 1.0}}
    assert "federation.rounds" in differing_settings(
        stored({**fcf, **dp}, 210), from_dict({**dp, "model": {"name": "fcf"}, "federation": {"rounds": 1000}})
    )
    gfmfr = {**fcf, "plugin": "gfmfr", "federation": {"rounds": 100}}
    # annealed over its cap (anneal_rounds None), a GFMFR run is another under another cap
    over_cap = {**gfmfr, "gfmfr": {"anneal_rounds": None}}
    assert differing_settings(stored(over_cap, 60), from_dict({**over_cap, "federation": {"rounds": 200}})) == [
        "federation.rounds"
    ]
    assert (
        differing_settings(
            stored({**gfmfr, "gfmfr": {"anneal_rounds": 80}}, 60),
            from_dict({**gfmfr, "gfmfr": {"anneal_rounds": 80}, "federation": {"rounds": 200}}),
        )
        == []
    )
    central = {"model": {"name": "fcf"}, "training": "centralised"}
    assert (
        differing_settings(
            stored({**central, "federation": {"rounds": 400}}, 12),
            from_dict({**central, "federation": {"rounds": 1000}}),
        )
        == []
    )


def test_compare_runs_every_method_on_every_dataset_of_its_axis(tmp_path, planted_folder):
    """A plan's [[datasets]] runs each method x seed once per dataset (a dataset may name its own seeds),
    each in its own folder and report, and the top report has one section per dataset, its table with
    HR@50 and NDCG@50 beside NDCG@10."""
    from gfmfr.compare import load_plan, run_path

    other = tmp_path / "other"
    other.mkdir()
    rows = (planted_folder / "interactions.csv").read_text().splitlines()
    (other / "interactions.csv").write_text("\n".join(rows[: len(rows) * 2 // 3]) + "\n")
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(f"""
seeds = [0]
models = ["fcf"]
baselines = ["popularity"]
[config]
model = {{ dim = 8 }}
federation = {{ rounds = 2, batch_size = 32 }}
[[datasets]]
label = "Planted"
set = {{ "data.dataset" = "{planted_folder}" }}
[[datasets]]
label = "Other set"
set = {{ "data.dataset" = "{other}" }}
seeds = [1]
""")
    out = tmp_path / "report"
    assert main(["compare", "--config", str(plan_path), "--out", str(out), "--no-progress"]) == 0
    plan = load_plan(plan_path)
    users = {}
    for folder, seed in (("planted", 0), ("other-set", 1)):
        for method in plan.methods:
            assert not run_path(out / folder, method, 1 - seed).exists()
            result = json.loads(run_path(out / folder, method, seed).read_text())
            users[folder] = result["data"]["users"] if "data" in result else users.get(folder)
        assert (out / folder / "report.md").exists()
    assert users["planted"] != users["other-set"]  # each ran on its own data
    report = (out / "report.md").read_text()
    assert "## Planted" in report and "## Other set" in report
    assert report.count("| method | seeds | HR@10 | NDCG@10 | HR@50 | NDCG@50 |") == 2
    assert "](planted/convergence.png)" in report
    from gfmfr.config import ConfigError

    plan_path.write_text(plan_path.read_text().replace("seeds = [1]", "seed = [1]"))
    with pytest.raises(ConfigError, match=r"datasets\[1\]: unknown key\(s\) \['seed'\]"):
        load_plan(plan_path)


def _processes_naming(text: str) -> list[int]:
    """The live processes whose command line contains ``text`` (Linux /proc)."""
    import os
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:  # ended meanwhile
                continue
    return found


def test_an_ended_comparison_leaves_no_run_behind(tmp_path, planted_folder):
    """SIGTERM to `gfmfr compare --jobs 2` ends its child runs too, and each keeps its checkpoint."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs /proc")
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(f"""
seeds = [0, 1]
models = ["fcf"]
[config]
data = {{ dataset = "{planted_folder}" }}
model = {{ dim = 8 }}
federation = {{ rounds = 100000, early_stop_patience = 0, batch_size = 32 }}
""")
    out = tmp_path / "report"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gfmfr.cli", "compare", "--config", str(plan_path), "--out", str(out), "--jobs", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = [out / "runs" / "fcf" / f"seed{k}" / "checkpoint.safetensors" for k in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(c.exists() for c in checkpoints) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(c.exists() for c in checkpoints) and len(_processes_naming(f"--out {out}/runs")) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    assert _processes_naming(f"--out {out}/runs") == []
    assert all(c.exists() for c in checkpoints)


def test_the_centralised_bound_stops_by_its_own_patience(planted):
    """Centralised training ends `centralised.patience` epochs after its best validation epoch, whatever
    the federation's patience is, and with patience 0 runs every epoch."""
    cfg = replace(
        small_config("fcf"),
        training="centralised",
        centralised=CentralisedConfig(epochs=60, batch_size=64, lr=0.01, patience=3),
    )
    res = run(cfg, dataset=planted)
    assert len(res["history"]) == res["best_round"] + 4 < 60
    longer = replace(cfg, federation=replace(cfg.federation, early_stop_patience=50))
    assert len(run(longer, dataset=planted)["history"]) == len(res["history"])
    whole = replace(cfg, centralised=replace(cfg.centralised, epochs=8, patience=0))
    assert len(run(whole, dataset=planted)["history"]) == 8
