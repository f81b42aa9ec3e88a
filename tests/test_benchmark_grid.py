"""The benchmark grid records a diverged run and keeps going; the table counts it apart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
ml100k_table = pytest.importorskip("ml100k_table")


def _result(ndcg: float) -> dict:
    metrics = {m: ndcg for m in ml100k_table.METRICS}
    return {"test": metrics, "valid": metrics, "best_round": 1, "seconds_per_round": 0.5}


def test_run_grid_records_divergence_and_goes_on(tmp_path, monkeypatch):
    import gfmfr.data.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "load_dataset", lambda cfg: None)
    calls = []

    def fake_run(values, dataset):
        calls.append(values["seed"])
        if values["seed"] == 1:
            raise FloatingPointError("training diverged in round 3")
        return _result(0.04 + values["seed"] / 100)

    monkeypatch.setattr(ml100k_table, "run_one", fake_run)
    out = tmp_path / "grid.jsonl"
    jobs = [({"model": "fcf", "seed": s}, []) for s in (0, 1, 2)]
    rows = ml100k_table.run_grid(jobs, "content", out)
    assert calls == [0, 1, 2]
    assert [("diverged" in r) for r in rows] == [False, True, False]
    assert len(out.read_text().splitlines()) == 3
    # a second start reuses every recorded row, diverged ones included
    assert ml100k_table.run_grid(jobs, "content", out) == [json.loads(x) for x in out.read_text().splitlines()]
    assert calls == [0, 1, 2]
    table = ml100k_table.summarize(rows, ["model"])
    line = table.splitlines()[1].split(" | ")
    assert line[0] == "fcf"
    assert line[2].startswith("0.0500 +- 0.0141")  # NDCG@10 over seeds 0 and 2 only
    assert line[-2:] == ["2", "1"]


def test_summarize_pairs_each_seed_with_its_baseline():
    rows = [
        {"spec": {"model": "fcf", "plugin": p, "seed": s}, "result": _result(v)}
        for p, s, v in [("none", 0, 0.04), ("none", 1, 0.05), ("gfmfr", 0, 0.045), ("gfmfr", 1, 0.0475)]
    ]
    lines = ml100k_table.summarize(rows, ["model", "plugin"], ("plugin", "none")).splitlines()
    gfmfr = lines[1].split(" | ")
    assert gfmfr[1] == "gfmfr"
    assert gfmfr[-2] == "+0.0012 (+0.0050, -0.0025)"
    assert lines[2].split(" | ")[-2] == "+0.0000 (+0.0000, +0.0000)"
