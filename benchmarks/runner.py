"""Shared by the sweep benchmarks: one ``gfmfr run`` per point, in a subprocess with one thread,
reused when its ``results.json`` already exists."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple


def run_point(
    folder: Path, model: str, sets: list[str], seed: int, plugin: str = "none", content: str | None = None
) -> dict:
    """Results of ``gfmfr run`` with these overrides (run now unless ``folder/results.json`` exists);
    ``{"error": last stderr line}`` if the run failed."""
    if not (folder / "results.json").exists():
        cmd = [
            sys.executable,
            "-m",
            "gfmfr.cli",
            "run",
            "--model",
            model,
            "--plugin",
            plugin,
            "--seed",
            str(seed),
            "--out",
            str(folder),
            "--no-progress",
            "--no-reference",
            "--resume",
            "--set",
            "runtime.threads=1",
        ]
        if content:
            cmd += ["--content", content]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads((folder / "results.json").read_text())


def first_reach(results: dict, target: float, metric: str = "NDCG@10") -> tuple[int, float] | None:
    """(rounds, wall seconds incl. evaluation) until validation ``metric`` first reaches ``target``."""
    seconds = 0.0
    for k, h in enumerate(results["history"]):
        seconds += sum(h["seconds"].values())
        if h.get("valid") and h["valid"][metric] >= target:
            return k + 1, seconds
    return None


class Upload(NamedTuple):
    """The size of one chunk's upload: its clients, item rows and signature floats."""

    clients: int
    rows: int
    signature_floats: int


@contextmanager
def uploads() -> Iterator[list[Upload]]:
    """The size of every upload the in-process engine folds into a round's aggregate while the block
    runs, in order (the engine's ``RoundAggregate.add`` wrapped; restored on exit): sizes only, so that
    counting holds no upload in memory. Clear the list between rounds to count one round's."""
    from gfmfr.federation import aggregation  # torch loads once the benchmark has set its threads

    seen: list[Upload] = []
    add = aggregation.RoundAggregate.add

    def counting_add(self, update, *rest):
        floats = 0 if update.signatures is None else update.signatures.numel()
        seen.append(Upload(len(update.users), len(update.row_item), floats))
        return add(self, update, *rest)

    aggregation.RoundAggregate.add = counting_add  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        aggregation.RoundAggregate.add = add  # type: ignore[method-assign]
