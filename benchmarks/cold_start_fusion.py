"""Why GFMFR's fused vectors rank cold items as they do: refits of the fusion model on one trained state.

Trains GFMFR-FCF on the ML-100K cold-items split (seed, early stopping as in a run), then, on the
state it ends in, scores the cold items on validation and test with:

- ``as trained``: the run's own fusion model (what the cold-start table reports);
- ``refit mse``: a fresh fusion model fitted to the last group targets C_g with many more steps;
- ``refit mse, no item view``: the same without the server-side item-ID view;
- ``item-view dropout``: refits that hide the item-ID view of a share of each step's items;
- ``refit score``: fitted in score space, mean over each group's members u of (u . Q_g(i) - u . C_g(i))^2,
  i.e. weighted by the members' second moment of user vectors (FCF's head is the user vector);
- ``table``: the global item table's own rows of the cold items (never trained: the floor).

Usage: python benchmarks/cold_start_fusion.py [--seed 0] [--steps 2000]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from gfmfr.build import build_run_model
from gfmfr.coldstart.sources import VectorSource
from gfmfr.config import from_dict
from gfmfr.data.dataset import load_dataset
from gfmfr.federation.engine import Federation
from gfmfr.plugins.group_fusion.fusion import GroupFusion, fit_fusion
from gfmfr.runtime import use_threads


class Fixed(VectorSource):
    """Given vectors: [G, n_cold, d] per group (or [1, ...])."""

    def __init__(self, name: str, vectors: torch.Tensor, group: np.ndarray):
        self.name, self.vectors, self.group = name, vectors, group

    def group_of(self, users: np.ndarray) -> np.ndarray | None:
        return self.group[users] if len(self.vectors) > 1 else None


def fit_score_space(
    fusion: GroupFusion,
    groups: torch.Tensor,
    targets: torch.Tensor,
    chol: torch.Tensor,
    items: torch.Tensor,
    steps: int,
    lr: float,
    dropout: float = 0.0,
) -> float:
    """Minimise mean_{g,i} ||L_g^T (Q_g(i) - C_g(i))||^2 with L_g L_g^T the members' second moment."""
    opt = torch.optim.Adam(fusion.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        drop = torch.rand(len(items), generator=gen) < dropout if dropout else None
        diff = fusion(groups, items, drop=drop) - targets[:, items]
        loss = (torch.einsum("gnd,gde->gne", diff, chol) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
    return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    use_threads(1)  # before any torch work
    cfg = from_dict(
        {
            "seed": args.seed,
            "plugin": "gfmfr",
            "model": {"name": "fcf"},
            "data": {"dataset": "ml-100k", "content": "../shared/datasets/ml-100k-content", "split": "cold-items"},
            "federation": {"rounds": args.rounds},
        }
    )
    data = load_dataset(cfg.data)
    model, plugins = build_run_model(data, cfg)
    fed = Federation(data, model, cfg, plugins)
    t0 = time.perf_counter()
    best = fed.fit()
    print(
        f"trained: best round {best['round']} of {len(fed.history)} in {time.perf_counter() - t0:.0f} s; "
        f"test NDCG@10 (GFMFR source) {best['test']['NDCG@10']:.4f}"
    )
    server = plugins[0].server
    group = server.grouping.group
    cold = torch.from_numpy(data.cold_items)
    warm = torch.from_numpy(data.warm_items)
    G = cfg.gfmfr.groups
    present = torch.from_numpy(np.unique(group[group >= 0]))
    targets = server.targets[present]
    users = torch.from_numpy(np.arange(data.n_users))
    u = fed.state.client_params(users.numpy())["user"]
    chol = []
    for g in present.tolist():
        members = u[torch.from_numpy(group == g)]
        second = members.T @ members / len(members) + 1e-6 * torch.eye(u.shape[1])
        chol.append(torch.linalg.cholesky(second))
    chol = torch.stack(chol)

    def fresh(item_view: bool) -> GroupFusion:
        return GroupFusion(
            G, model.dim, server.features, server.masks, cfg.gfmfr.fusion, args.seed, item_view, server.known
        )

    def vectors(fusion: GroupFusion) -> torch.Tensor:
        with torch.no_grad():
            return fusion(torch.arange(G), cold)

    rows = {"as trained": server.item_vectors(cold)}
    for item_view in (True, False):
        f = fresh(item_view)
        loss = fit_fusion(f, present, targets, args.steps, cfg.gfmfr.server_lr, seed=args.seed, items=warm)
        rows[f"refit mse{'' if item_view else ', no item view'} (loss {loss:.3f})"] = vectors(f)
        f = fresh(item_view)
        loss = fit_score_space(f, present, targets, chol, warm, args.steps, cfg.gfmfr.server_lr)
        rows[f"refit score{'' if item_view else ', no item view'} (loss {loss:.3f})"] = vectors(f)
    for dropout in (0.25, 0.5):
        f = fresh(True)
        loss = fit_fusion(
            f, present, targets, args.steps, cfg.gfmfr.server_lr, seed=args.seed, items=warm, item_view_dropout=dropout
        )
        rows[f"refit mse, item-view dropout {dropout}"] = vectors(f)
        f = fresh(True)
        loss = fit_score_space(f, present, targets, chol, warm, args.steps, cfg.gfmfr.server_lr, dropout)
        rows[f"refit score, item-view dropout {dropout}"] = vectors(f)
    rows["table (untrained rows)"] = fed.state.shared[model.item_table][cold][None]
    print(f"{'source':<40}{'valid NDCG@10':>15}{'test NDCG@10':>15}{'test HR@50':>12}{'all NDCG@10':>13}")
    for name, vec in rows.items():
        source = Fixed(name, vec, group)
        scores = {
            split: fed.evaluator.evaluate(lambda us, source=source: fed.cold.score(source, us), split)
            for split in ("valid", "test")
        }
        print(
            f"{name:<40}{scores['valid']['NDCG@10']:>15.4f}{scores['test']['NDCG@10']:>15.4f}"
            f"{scores['test']['HR@50']:>12.4f}{scores['test']['all NDCG@10']:>13.4f}"
        )


if __name__ == "__main__":
    main()
