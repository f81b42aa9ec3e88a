"""The published KU and Amazon Scientific folders (``../shared/datasets``), read as their authors lay them out,
and every method run on them for a few rounds."""

import json
import subprocess
import sys
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


def test_the_published_layout_runs_on_flower_with_the_in_process_numbers(tmp_path):
    """`gfmfr run --backend flower` on KU as published (its split_label split, its CLIP features),
    GFMFR on FedRAP (private state on the nodes, GFMFR's server), gives the in-process validation,
    round by round. Each method on Flower: tests/test_flower.py."""
    out = tmp_path / "flower"
    command = [sys.executable, "-m", "gfmfr.cli", "run", "--dataset", str(folder("ku")), "--model", "fedrap"]
    command += ["--plugin", "gfmfr", "--backend", "flower"]
    command += ["--nodes", "2", "--set", "federation.rounds=2", "--set", "runtime.save_model=false"]
    proc = subprocess.run(
        [*command, "--no-progress", "--no-reference", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    flower = json.loads((out / "results.json").read_text())
    inprocess = run(from_dict({**flower["config"], "runtime": {"threads": 1, "backend": "in-process"}}))
    for a, b in zip(flower["history"], inprocess["history"], strict=True):
        assert a["valid"]["NDCG@10"] == pytest.approx(b["valid"]["NDCG@10"], rel=1e-3, abs=1e-4)
