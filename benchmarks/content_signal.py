"""How much of a federated item table the item content explains, per dataset.

    python benchmarks/content_signal.py --work runs/content-signal

For each dataset, FCF is trained federated with the defaults (seed 0; reused when its run folder
exists) and saved at its best validation round. Its item table V (items x d) is then predicted from
the items' content features (every modality the dataset has, each L2-normalised, side by side) by
ridge regression, cross-validated over 5 folds of items (scikit-learn's ``RidgeCV`` chooses the
penalty inside each training fold). The figure is the share of V's variance that the held-out
predictions explain (R^2 over all d columns together), over the items some client trained, and
separately over the long-tail ones among them (``eval.tail_max_count`` training interactions or
fewer), whose rows few clients train and where content has most to add. Items without content are
left out.

A table whose rows content explains well is one where a content prior (GFMFR's
``gfmfr.content_prior``) or a content projection (MM-X) can stand in for the clients' evidence;
one it explains barely leaves GFMFR only its distillation.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict

from gfmfr.data.dataset import load_dataset
from gfmfr.data.encoders import dataset_features
from gfmfr.serving.saved import load_model
from runner import run_point

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATASETS = {
    "ML-100K": ("ml-100k", str(SHARED / "ml-100k-content")),
    "KU": (str(SHARED / "ku"), None),
    "Amazon Scientific": (str(SHARED / "amazon-scientific"), None),
}
log = logging.getLogger("content_signal")


def explained(table: np.ndarray, content: np.ndarray, seed: int = 0) -> float:
    """Cross-validated R^2 of ``table`` from ``content`` (ridge, 5 folds of rows, all columns pooled)."""
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 13))
    predicted = cross_val_predict(ridge, content, table, cv=KFold(5, shuffle=True, random_state=seed))
    residual = ((table - predicted) ** 2).sum()
    total = ((table - table.mean(0)) ** 2).sum()
    return float(1 - residual / total)


def features(item_features: dict[str, np.ndarray]) -> np.ndarray:
    """Every modality, each row L2-normalised, side by side."""
    parts = []
    for name in sorted(item_features):
        f = item_features[name].astype(np.float64)
        parts.append(f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12))
    return np.concatenate(parts, axis=1)


def measure(label: str, dataset: str, content: str | None, work: Path) -> dict:
    folder = work / label.lower().replace(" ", "-")
    results = run_point(folder, "fcf", [f"data.dataset={dataset}", "runtime.save_model=true"], 0, content=content)
    if "error" in results:
        raise RuntimeError(f"{label}: {results['error']}")
    saved = load_model(folder)
    data = saved.dataset if saved.dataset is not None else load_dataset(saved.cfg.data)
    table = saved.state.shared[saved.state.model.item_table].numpy().astype(np.float64)
    counts = np.bincount(data.train_items, minlength=data.n_items)
    content = dataset_features(data)  # the precomputed files, or the raw content encoded (cached)
    has = np.logical_and.reduce(list(content.mask.values()))
    trained = (counts > 0) & has
    tail = trained & (counts <= saved.cfg.eval.tail_max_count)
    x = features(content.features)
    return {
        "dataset": label,
        "items trained": int(trained.sum()),
        "long-tail": int(tail.sum()),
        "modalities": "+".join(sorted(content.features)),
        "R2 all": explained(table[trained], x[trained]),
        "R2 long-tail": explained(table[tail], x[tail]) if tail.sum() >= 50 else float("nan"),
        "best round": results["best_round"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/content-signal"), help="run folders (reused)")
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), help=f"of {list(DATASETS)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for label in args.datasets:
        dataset, content = DATASETS[label]
        if dataset != "ml-100k" and not Path(dataset).exists():
            log.info("%s: %s not present, skipped", label, dataset)
            continue
        rows.append(measure(label, dataset, content if content and Path(content).exists() else None, args.work))
    log.info("| dataset | content | items trained | R^2 all | long-tail items | R^2 long-tail | FCF best round |")
    log.info("|---|---|---|---|---|---|---|")
    for r in rows:
        log.info(
            "| %s | %s | %d | %.3f | %d | %.3f | %d |",
            r["dataset"],
            r["modalities"],
            r["items trained"],
            r["R2 all"],
            r["long-tail"],
            r["R2 long-tail"],
            r["best round"],
        )


if __name__ == "__main__":
    main()
