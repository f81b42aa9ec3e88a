"""The published KU and Amazon Scientific folders (``../shared/datasets``), read as their authors lay them out,
and every method run on them for a few rounds."""

from pathlib import Path

import numpy as np
import pytest

from gfmfr.config import DataConfig, from_dict
from gfmfr.data.dataset import load_dataset
from gfmfr.run import run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
pytestmark = pytest.mark.slow


def folder(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"../shared/datasets/{name} not present")
    return path


@pytest.fixture(scope="module")
def ku():
    return load_dataset(DataConfig(dataset=str(folder("ku"))))


def test_ku_as_published(ku):
    r = ku.report
    # 5 repeated (user, item) training pairs; the split is the file's own: one validation and one test each
    assert (r["rows_read"], r["users"], r["items"], r["dropped"]) == (3489, 204, 560, {"duplicate_pair": 5})
    assert r["split"] == "split_label" and (r["valid"], r["test"]) == (204, 204)
    assert ku.item_features["text"].shape == (560, 512) and ku.item_features["image"].dtype == np.float32


def test_amazon_scientific_carries_clip_features_and_raw_text():
    path = folder("amazon-scientific")
    d = load_dataset(DataConfig(dataset=str(path)))
    assert (d.n_users, d.n_items) == (2928, 1585) and d.report["split"] == "split_label"
    # held-out items that repeat one of the user's training items cannot be ranked: not evaluated
    assert 2880 < d.report["test"] < 2928
    assert d.item_features["text"].shape == (1585, 512) and d.item_text[0].startswith("Vive Suction Cup")


@pytest.mark.parametrize(
    "settings",
    [
        {"model": {"name": "fcf"}, "plugin": "gfmfr"},
        {"model": {"name": "pfedrec"}, "plugin": "gfmfr"},
        {"model": {"name": "fedncf"}, "plugin": "gfmfr"},
        {"model": {"name": "fedrap"}, "plugin": "gfmfr"},
        {"model": {"name": "fcf"}, "wrapper": "mmx"},
        {"model": {"name": "fcf"}, "wrapper": "fedvlr"},
        {"model": {"name": "fcf"}, "training": "centralised", "centralised": {"epochs": 2}},
        {"model": {"name": "content-knn"}},
    ],
    ids=lambda s: "-".join(
        str(v) for v in (s.get("plugin"), s.get("wrapper"), s.get("training"), s["model"]["name"]) if v
    ),
)
def test_every_method_runs_on_ku(ku, settings):
    cfg = from_dict({**settings, "data": {"dataset": str(folder("ku"))}, "federation": {"rounds": 6}})
    res = run(cfg, dataset=ku)
    assert np.isfinite(res["test"]["NDCG@10"]) and res["test"]["HR@50"] > 0
