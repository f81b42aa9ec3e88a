"""How good is GFMFR's teacher? Validation ranking of the student and of what it is distilled towards.

Runs one GFMFR federation on ML-100K (shared content) and, after every round, ranks each user's
validation item (full ranking) with:
- ``student``: the client's own model (what GFMFR reports);
- ``teacher``: the group preferences p_g(i) the client is distilled towards;
- ``own head x Q_g``: the client's own head applied to its group's fused vectors;
- ``own head x C_g``: the client's own head applied to its group's target (the members' mean
  uploaded item table), i.e. before the fusion model;
- ``own head x global``: the client's own head applied to the FedAvg item table;
- ``student + teacher``: the sum of the student's logit and the teacher's (a product of the two
  experts), what a client could rank with if it received its group's whole preference vector.
If the teacher ranks worse than the student, the KL term can only help as a regulariser; the
gap between the last three shows what the group average and the fusion model lose. Validation
only: this is a diagnostic for choosing the method, never a test score.

    python benchmarks/gfmfr_teacher.py --model fcf --seed 0 [--set federation.rounds=30] [--out runs/teacher.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch


def own_head_scores(fed, users: np.ndarray, vectors: torch.Tensor) -> torch.Tensor:
    """Logits [U, n_items] of ``vectors`` [U, n_items, d] under each user's current head."""
    model = fed.model
    heads = model.head_from_signature(model.head_signature(fed.state.client_params(users)))
    return model.head_score(heads, vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fcf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--content", default="../shared/datasets/ml-100k-content")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", help="write the per-round figures here (JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    from gfmfr.build import build_run_model
    from gfmfr.config import apply_overrides, from_dict
    from gfmfr.data.dataset import load_dataset
    from gfmfr.federation.engine import Federation

    values = apply_overrides(
        {"seed": args.seed, "data": {"content": args.content}}, [f"model.name={args.model}", "plugin=gfmfr", *args.set]
    )
    cfg = from_dict(values)
    torch.manual_seed(cfg.seed)
    dataset = load_dataset(cfg.data)
    model, plugins = build_run_model(dataset, cfg)
    gfmfr = plugins[0].server
    fed = Federation(dataset, model, cfg, plugins)
    table = model.item_table

    def group_of(users: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(gfmfr.grouping.group[users]).clamp_min(0)

    scorers = {
        "student": fed.state.score,
        "teacher": lambda users: gfmfr.preferences[group_of(users)],
        "own head x Q_g": lambda users: own_head_scores(fed, users, gfmfr.fused[group_of(users)]),
        "own head x C_g": lambda users: own_head_scores(fed, users, gfmfr.targets[group_of(users)]),
        "own head x global": lambda users: own_head_scores(
            fed, users, fed.state.shared[table].expand(len(users), *fed.state.shared[table].shape)
        ),
        "student + teacher": lambda users: (
            fed.state.score(users) + torch.logit(gfmfr.preferences[group_of(users)], eps=1e-6)
        ),
    }
    rows = []
    header = f"{'round':>5}" + "".join(f"{name:>20}" for name in scorers)
    sys.stdout.write(f"valid NDCG@10, {args.model}, seed {args.seed}\n{header}\n")
    for t in range(cfg.federation.rounds):
        fed.train_round(t)
        row = {"round": t, **{name: fed.evaluator.evaluate(fn, "valid")["NDCG@10"] for name, fn in scorers.items()}}
        rows.append(row)
        sys.stdout.write(f"{t:>5}" + "".join(f"{row[name]:>20.4f}" for name in scorers) + "\n")
        sys.stdout.flush()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"model": args.model, "seed": args.seed, "set": args.set, "valid_ndcg10": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
