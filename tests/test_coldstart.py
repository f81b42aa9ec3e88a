"""The cold-items split, its evaluation protocol, and the cold items' vectors from content."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import dataset_from_frame, planted_frame
from gfmfr.config import ConfigError, DataConfig, EvalConfig, from_dict
from gfmfr.data.sampling import client_negatives, train_keys, training_negatives
from gfmfr.eval.evaluator import Evaluator
from gfmfr.run import run

COLD = DataConfig(split="cold-items")


def test_cold_split_leaves_the_cold_items_out_of_training():
    frame = planted_frame()
    d = dataset_from_frame(frame, COLD)
    cold = set(d.cold_items.tolist())
    assert len(cold) == round(0.2 * d.n_items)
    assert not cold & set(d.train_items.tolist())  # no interaction with a cold item trains
    cold_ids = set(d.item_ids[d.cold_items].tolist())
    assert d.report["dropped"]["interactions_with_cold_items"] == int(frame["item_id"].isin(cold_ids).sum())
    assert len(d.train_items) + d.report["dropped"]["interactions_with_cold_items"] == len(frame)
    for split in (d.valid_items, d.test_items):  # validation and test see only cold items
        assert set(split[split >= 0].tolist()) <= cold
    # the test is each user's latest interaction with a cold item, validation the one before it
    for u in range(d.n_users):
        rows = frame[frame.user_id == d.user_ids[u]].sort_values("timestamp")
        mine = [i for i in rows.item_id if i in cold_ids]
        index = {str(v): k for k, v in enumerate(d.item_ids)}
        assert d.test_items[u] == (index[mine[-1]] if mine else -1)
        assert d.valid_items[u] == (index[mine[-2]] if len(mine) > 1 else -1)
    assert np.array_equal(dataset_from_frame(frame, COLD).cold_items, d.cold_items)  # seeded
    other = dataset_from_frame(frame, DataConfig(split="cold-items", split_seed=1))
    assert not np.array_equal(other.cold_items, d.cold_items)


def test_negatives_never_draw_a_cold_item_and_a_client_draws_its_own_alone():
    d = dataset_from_frame(planted_frame(), COLD)
    users = np.arange(d.n_users)
    owner, items = training_negatives(d, users, 4, seed=3, round_=2, keys=train_keys(d))
    assert not np.isin(items, d.cold_items).any()
    for u in (0, 7, 41):
        alone = client_negatives(d.user_train(u), d.n_items, 4, 3, u, 2, d.warm_items)
        np.testing.assert_array_equal(alone, items[owner == u])


def test_cold_protocol_ranks_among_the_cold_items_and_among_all():
    d = dataset_from_frame(planted_frame(), COLD)
    ev = Evaluator(d, EvalConfig(ks=(1, 10)))
    users = ev.evaluated_users("test")
    np.testing.assert_array_equal(users, np.flatnonzero(d.test_items >= 0))  # users with a cold test item

    def score(us: np.ndarray) -> torch.Tensor:  # every warm item above every cold one, the target first of those
        s = torch.zeros(len(us), d.n_items)
        s[:, torch.from_numpy(d.warm_items)] = 10.0
        s[torch.arange(len(us)), torch.from_numpy(d.test_items[us])] = 5.0
        return s

    m = ev.evaluate(score, "test")
    assert m["HR@1"] == 1.0  # first among the cold items
    assert m["all HR@10"] == 0.0  # below the warm items the user has not trained on
    assert "tail HR@1" not in m
    assert set(ev.evaluate(score, "test", all_items=False)) == {k for k in m if not k.startswith("all ")}


def test_cold_split_settings_that_cannot_go_together():
    with pytest.raises(ConfigError, match="eval.protocol"):
        from_dict({"data": {"split": "cold-items"}, "eval": {"protocol": "sampled"}})
    with pytest.raises(ConfigError, match="cold_source"):
        from_dict({"data": {"split": "cold-items"}, "eval": {"cold_source": "gfmfr"}})
    with pytest.raises(ConfigError, match="cold_item_fraction"):
        from_dict({"data": {"cold_item_fraction": 1.0}})
    with pytest.raises(ConfigError, match="in-process"):
        from_dict({"data": {"split": "cold-items"}, "runtime": {"backend": "flower"}})


def content_frame(
    n_users: int = 200, n_items: int = 400, k: int = 16, d: int = 8, per_user: int = 30, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """A planted federation whose item vectors are a linear map of the items' content: each user picks
    ``per_user`` items with probabilities softmax(3 u . v_i), v_i = A x_i."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_items, k))
    v = x @ rng.normal(size=(k, d)) / np.sqrt(k)
    u = rng.normal(size=(n_users, d))
    rows = []
    for a in range(n_users):
        logits = 3 * (v @ u[a])
        p = np.exp(logits - logits.max())
        chosen = rng.choice(n_items, size=per_user, replace=False, p=p / p.sum())
        rows += [(f"u{a}", f"{i}", 4.0, 1000 + t) for t, i in enumerate(chosen)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]), x


@pytest.fixture(scope="module")
def content_federation():
    frame, x = content_frame()
    d = dataset_from_frame(frame, COLD)
    d.item_features = {"text": x[d.item_ids.astype(int)].astype(np.float32)}
    return d


def cold_config(**extra):
    return from_dict(
        {
            "seed": 0,
            "data": {"split": "cold-items"},
            "model": {"name": "fcf", "dim": 8},
            "federation": {"rounds": 30, "early_stop_patience": 0},
            "multimodal": {"modalities": ["text"], "content_dim": None},
            "gfmfr": {"modalities": ["text"], "content_dim": None, "server_every": 2},
            **extra,
        }
    )


@pytest.mark.parametrize(
    "extra, source", [({}, "ifedrec"), ({"wrapper": "mmx"}, "mmx"), ({"plugin": "gfmfr"}, "gfmfr")]
)
def test_content_determined_cold_items_rank_far_above_random(content_federation, extra, source):
    result = run(cold_config(**extra), dataset=content_federation)
    test = result["test"]
    floor = test["random NDCG@10"]
    assert 0.03 < floor < 0.12  # about 10 of 74 cold items: random
    assert test["NDCG@10"] > 1.8 * floor, (source, test["NDCG@10"], floor)
    assert test["knn NDCG@10"] > 2.5 * floor
    assert test["all NDCG@10"] > 5 * test["random all NDCG@10"]  # on the known items' scale, too
    if source != "ifedrec":
        assert test["ifedrec NDCG@10"] > 1.8 * floor


@pytest.mark.parametrize("extra", [{"plugin": "gfmfr"}, {"wrapper": "mmx"}])
def test_new_items_get_the_vectors_the_cold_start_evaluation_scored(content_federation, tmp_path, extra):
    """Served as new items, the cold items' content gives the vectors the cold-items evaluation used."""
    from gfmfr.serving.new_items import NewItems, new_item_scores, new_item_vectors
    from gfmfr.serving.recommend import top_k
    from gfmfr.serving.saved import load_model

    d = content_federation
    cfg = cold_config(**extra)
    cfg = replace(cfg, federation=replace(cfg.federation, rounds=6))
    run(cfg, out=tmp_path, dataset=d)
    saved = load_model(tmp_path, dataset=d)
    cold = torch.from_numpy(d.cold_items)
    x = d.item_features["text"][d.cold_items]
    new = NewItems([f"new{k}" for k in range(len(x))], ["t"] * len(x), {"text": x}, {"text": np.ones(len(x), bool)})
    vectors = new_item_vectors(saved, new)
    if "plugin" in extra:
        expected = saved.plugins[0].server.item_vectors(cold)
    else:
        expected = saved.state.model.content_vectors(saved.state.shared, cold)[None]
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=1e-5)
    # the catalogue's reductions are fitted once per model: a fresh load reads them from the model folder
    from gfmfr.data.encoders import ContentReduction
    from gfmfr.serving.saved import REDUCTIONS

    assert (tmp_path / "model" / REDUCTIONS).exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ContentReduction, "fit", lambda *a, **k: pytest.fail("refitted the catalogue's PCA"))
        torch.testing.assert_close(new_item_vectors(load_model(tmp_path, dataset=d), new), vectors)
    users = np.arange(5)
    scores = new_item_scores(saved, users, vectors)
    assert scores.shape == (5, len(x))
    rec = top_k(saved, users, k=d.n_items + len(x), extra=scores)  # new items rank with the known ones
    assert (rec.items >= d.n_items).any(axis=1).all()


def test_new_items_need_a_content_model(content_federation, tmp_path):
    from gfmfr.serving.errors import ModelError
    from gfmfr.serving.saved import content_source, load_model

    cfg = from_dict(
        {
            "data": {"split": "cold-items"},
            "model": {"name": "fcf", "dim": 8},
            "federation": {"rounds": 2},
            "multimodal": {"modalities": ["text"], "content_dim": None},
        }
    )
    run(cfg, out=tmp_path, dataset=content_federation)
    with pytest.raises(ModelError, match="GFMFR .* or MM-X"):
        content_source(load_model(tmp_path, dataset=content_federation))


@pytest.mark.parametrize("extra", [{}, {"wrapper": "mmx"}])
def test_recommend_scores_a_cold_runs_held_out_items_from_content_or_never(content_federation, tmp_path, extra):
    from gfmfr.coldstart.evaluation import ColdStart
    from gfmfr.serving.recommend import top_k
    from gfmfr.serving.saved import load_model

    cfg = cold_config(**extra)
    run(replace(cfg, federation=replace(cfg.federation, rounds=4)), out=tmp_path, dataset=content_federation)
    saved = load_model(tmp_path, dataset=content_federation)
    users = np.arange(20)
    rec = top_k(saved, users, k=content_federation.n_items)
    cold = np.isin(rec.items, content_federation.cold_items)
    if not extra:  # FCF alone has nothing to score them with
        assert not (cold & np.isfinite(rec.scores)).any()
    else:  # MM-X scores them as the cold-start evaluation did
        assert (cold & np.isfinite(rec.scores)).any()
        scorer = ColdStart(content_federation, saved.state.model, saved.cfg, (), saved.state)
        source = scorer.sources["mmx"]
        source.refresh(saved.state.shared)
        expected = scorer.score(source, users)
        finite = np.isfinite(rec.scores)  # the rest: items the user interacted with
        torch.testing.assert_close(
            torch.from_numpy(rec.scores[finite]),
            expected.gather(1, torch.from_numpy(rec.items))[torch.from_numpy(finite)],
            atol=1e-5,
            rtol=1e-5,
        )
