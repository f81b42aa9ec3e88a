"""Saved models and recommendations."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from tests.test_gfmfr import gfmfr_config, with_features
from tests.test_model_contract import small_config

from gfmfr.build import build_run_model
from gfmfr.eval.evaluator import Evaluator
from gfmfr.federation.engine import Federation
from gfmfr.models import build_model
from gfmfr.run import run
from gfmfr.serving.recommend import blocks, top_k
from gfmfr.serving.saved import ModelError, load_model, save_model


@pytest.mark.parametrize("name", ["fcf", "fedrap"])
def test_a_run_saves_its_best_round_and_the_loaded_model_scores_it_exactly(planted, tmp_path, name):
    cfg = small_config(name, rounds=8)
    res = run(cfg, out=tmp_path, dataset=planted)
    saved = load_model(tmp_path, dataset=planted)
    assert saved.round == res["best_round"]
    # the test metrics at the best round, recomputed from the saved model, are the run's
    ev = Evaluator(planted, cfg.eval, cfg.seed, cfg.runtime.eval_batch)
    assert ev.evaluate(saved.state.score, "test") == res["test"]
    assert saved.user_ids == [str(u) for u in planted.user_ids] and saved.item_ids == [str(i) for i in planted.item_ids]


def test_save_load_round_trip_is_exact_with_gfmfr(planted, tmp_path):
    data = with_features(planted)
    cfg = gfmfr_config("fcf")
    model, plugins = build_run_model(data, cfg)
    fed = Federation(data, model, cfg, plugins)
    for t in range(3):
        fed.train_round(t)
    save_model(tmp_path, fed, 2, None)
    saved = load_model(tmp_path, dataset=data)
    users = np.arange(data.n_users)
    assert torch.equal(saved.state.score(users), fed.score(users))
    assert torch.equal(saved.plugins[0].server.preferences, plugins[0].server.preferences)
    assert np.array_equal(saved.plugins[0].server.grouping.group, plugins[0].server.grouping.group)


def test_a_model_saved_with_other_content_or_shapes_is_refused(planted, tmp_path):
    data = with_features(planted)
    cfg = replace(gfmfr_config("fcf"), federation=replace(gfmfr_config("fcf").federation, rounds=2))
    run(cfg, out=tmp_path, dataset=data)
    load_model(tmp_path, dataset=data)  # the same content: fine
    with pytest.raises(ModelError, match="other content features"):
        load_model(tmp_path, dataset=with_features(planted, seed=1))
    fed = Federation(planted, build_model(planted.n_items, small_config("fcf").model), small_config("fcf"))
    fed.cfg = replace(fed.cfg, model=replace(fed.cfg.model, dim=8))  # the config no longer fits the tensors
    save_model(tmp_path / "bad", fed, 0, None)
    with pytest.raises(ModelError, match="shape"):
        load_model(tmp_path / "bad", dataset=planted)
    with pytest.raises(ModelError, match="no saved model"):
        load_model(tmp_path / "nothing")
    unsaved = replace(small_config("fcf", rounds=2), runtime=replace(small_config("fcf").runtime, save_model=False))
    run(unsaved, out=tmp_path / "unsaved", dataset=planted)
    assert (tmp_path / "unsaved" / "results.json").exists() and not (tmp_path / "unsaved" / "model").exists()


def test_recommendations_never_hold_an_interacted_item_and_are_the_best_others(planted, tmp_path):
    cfg = small_config("fcf", rounds=4)
    run(cfg, out=tmp_path, dataset=planted)
    saved = load_model(tmp_path, dataset=planted)
    users = np.arange(planted.n_users)
    recs = list(blocks(saved, users, k=10, block=7))
    items = np.concatenate([r.items for r in recs])
    for u in users:
        seen = set(planted.user_train(u)) | {planted.valid_items[u], planted.test_items[u]}
        assert not seen & set(items[u].tolist())
        scores = saved.state.score(np.array([u]))[0].detach().numpy()
        others = np.array([i for i in range(planted.n_items) if i not in seen])
        best = others[np.argsort(-scores[others], kind="stable")[:10]]
        assert np.allclose(np.sort(scores[best]), np.sort(scores[items[u]]))
    one = top_k(saved, np.array([5]), k=3)
    assert one.items.shape == (1, 3) and np.all(np.diff(one.scores[0]) <= 0)


def test_recommend_cli(planted_folder, tmp_path, capsys, caplog):
    from gfmfr.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--dataset",
                str(planted_folder),
                "--model",
                "fcf",
                "--set",
                "federation.rounds=3",
                "--out",
                str(out),
                "--no-progress",
                "--no-reference",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["recommend", "--run", str(out), "--user", "u3", "-k", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["user"] == "u3" and len(got["items"]) == 4
    assert {"item", "title", "score"} <= set(got["items"][0])
    assert main(["recommend", "--run", str(out), "--all-users", "--out", str(tmp_path / "all.csv"), "-k", "2"]) == 0
    lines = (tmp_path / "all.csv").read_text().strip().splitlines()
    assert lines[0] == "user,rank,item,score" and len(lines) == 1 + 80 * 2
    assert main(["recommend", "--run", str(out), "--user", "nobody"]) == 2
    assert "user 'nobody' is not in this model" in capsys.readouterr().err


def test_titles_come_from_the_item_text():
    from gfmfr.serving.saved import title_of

    assert title_of("E.T. the Extra-Terrestrial (1982). Genres: Children's", "7") == "E.T. the Extra-Terrestrial (1982)"
    assert title_of("A plain description. More.", "8") == "A plain description"
    assert title_of(None, "9") == "9"


@pytest.mark.slow
def test_recommend_cli_ranks_new_items_from_their_text(planted_folder, tmp_path, capsys, caplog, monkeypatch):
    pytest.importorskip("sentence_transformers")
    from gfmfr.cli import main

    monkeypatch.setenv("GFMFR_CACHE", str(tmp_path / "cache"))
    genres = ["war", "comedy", "horror", "romance"]
    (planted_folder / "items.csv").write_text(
        "item_id,text\n" + "".join(f"{i},Film {i} (1990). A {genres[i // 15]} film.\n" for i in range(60))
    )
    (tmp_path / "plan.toml").write_text(
        'plugin = "gfmfr"\n[model]\nname = "fcf"\ndim = 16\n[federation]\nrounds = 3\n'
        '[gfmfr]\nmodalities = ["text"]\ngroups = 2\n'
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--dataset",
                str(planted_folder),
                "--content",
                str(planted_folder),
                "--config",
                str(tmp_path / "plan.toml"),
                "--out",
                str(out),
                "--no-progress",
                "--no-reference",
            ]
        )
        == 0
    )
    (tmp_path / "new.csv").write_text(
        "item_id,text\nn1,Brand New (2030). A war film.\nn2,Other (2031). A comedy film.\n"
    )
    capsys.readouterr()
    assert (
        main(
            [
                "recommend",
                "--run",
                str(out),
                "--user",
                "u3",
                "-k",
                "100",
                "--new-items",
                str(tmp_path / "new.csv"),
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)["items"]
    new = [it for it in got if it["new"]]
    assert {it["item"] for it in new} == {"n1", "n2"} and new[0]["title"] in ("Brand New (2030)", "Other (2031)")
    seen = sum(1 for line in (planted_folder / "interactions.csv").read_text().splitlines() if line.startswith("u3,"))
    assert len(got) == 2 + 60 - seen  # every item u3 has not interacted with, and the new ones
    (tmp_path / "clash.csv").write_text("item_id,text\nn1,x\n7,y\n")
    assert main(["recommend", "--run", str(out), "--user", "u3", "--new-items", str(tmp_path / "clash.csv")]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "already in the model's catalogue" in err
