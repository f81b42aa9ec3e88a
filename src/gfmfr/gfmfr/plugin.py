"""GFMFR as a plug-in for any base model (docs/method.md, steps 4-8).

Server, after FedAvg in round t: group the participants by their prediction heads
(:mod:`.grouping`), average each group's uploaded shared item tables into the targets C_g,
fit the group fusion model Q_g(i) to them (:mod:`.fusion`), and score every fused vector with
the group's mean head: p_g(i) = sigmoid(head_g(Q_g(i))) (:func:`teacher`).
Client, in round t+1: add w_t * KL(Bernoulli(p_g(i)) || Bernoulli(yhat_ui)) over its training
pairs, or only its sampled negatives (``distill_on``; :mod:`.distill`). Round 0 and clients
without a group use the base loss alone.

Changes from the reference code, each to make the mechanism carry information:
- the teacher applies the whole head (hidden layers and the user vector included) that the
  fused vectors stand in for, not only its last linear layer, and by default averages the
  members' predictions instead of their parameters, so p_g(i) varies across items;
- the ratio L_base / L_KL is capped (``max_ratio``): once student and teacher agree it explodes;
- the KL term is averaged over the configured batch size, not over the pairs a batch holds: a
  client's last, nearly empty batch of an epoch (2 pairs for 770 examples and B = 256) would
  otherwise weigh each pair 128 times more, and with the item tables' large learning rate the
  KL term, which does not saturate as BCE does, then oscillates and diverges (FedRAP, seed 0);
- the KL term can cover only the sampled negatives (``distill_on``): on a positive the client has
  its label, and pulling it towards a group average lowered validation NDCG@10; on an unobserved
  item the group's preference is information the client lacks;
- the KL term can train only the client's private parameters, or only the shared ones
  (``distill_into``), leaving the others to the base loss;
- a client can rank with its group's fused vectors Q_g in place of the FedAvg item table
  (``score_with = "group"``; plug-in hook ``item_tables``), the lead the teacher diagnostic gave;
- spectral clustering is seeded and runs on standardised, PCA-reduced signatures;
- the EMA ratio and the annealing are pure functions of their inputs and the round.

The plug-in touches the base model only through its hooks: ``item_table``,
``head_signature`` / ``head_from_signature`` and ``head_score``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch

from gfmfr.config import RunConfig
from gfmfr.data.dataset import Dataset
from gfmfr.data.encoders import reduce_features
from gfmfr.federation.aggregation import group_sums
from gfmfr.federation.client import Batch, LocalUpdate
from gfmfr.gfmfr.distill import SCHEDULES, bernoulli_kl, distill_weight, ema
from gfmfr.gfmfr.fusion import GroupFusion, fit_fusion
from gfmfr.gfmfr.grouping import Grouping
from gfmfr.models.base import FederatedRecommender, Params

log = logging.getLogger(__name__)


def teacher_mean_head(model: FederatedRecommender, heads: Params, fused: torch.Tensor) -> torch.Tensor:
    """p_g(i) = sigmoid(head_g(Q_g(i))) with group-mean heads [G, ...] and fused vectors [G, n_items, d]."""
    return torch.sigmoid(model.head_score(heads, fused))


def teacher_members(model: FederatedRecommender, signatures: torch.Tensor, labels: torch.Tensor,
                    fused: torch.Tensor, block: int = 256) -> torch.Tensor:
    """p_g(i) = mean over members u of g of sigmoid(head_u(Q_g(i))): [G, n_items].

    ``signatures`` [C, k] are the members' heads, ``labels`` [C] index rows of ``fused``.
    Averaging predictions rather than parameters keeps the group's preference: personal heads
    (FCF's user vectors, say) average to nearly zero, which makes p_g(i) about 0.5 everywhere.
    Members are scored group by group, in blocks, against their group's table broadcast (not copied).
    """
    out = torch.zeros(fused.shape[0], fused.shape[1])
    for g in range(fused.shape[0]):
        members = torch.nonzero(labels == g).flatten()
        for part in members.split(block):
            heads = model.head_from_signature(signatures[part])
            out[g] += torch.sigmoid(model.head_score(heads, fused[g].expand(len(part), *fused[g].shape))).sum(0)
        out[g] /= max(len(members), 1)
    return out


def distill_mask(batch: Batch, on: str) -> torch.Tensor:
    """[A, B] 1 on the pairs the KL term covers: every real pair, or only the sampled negatives."""
    if on == "all":
        return batch.mask
    if on == "negatives":
        return batch.mask * (1 - batch.labels)
    raise ValueError(f"gfmfr.distill_on must be 'all' or 'negatives', got {on!r}")


DISTILL_INTO = ("all", "private", "shared")

CHOICES = {
    "schedule": SCHEDULES,
    "distill_on": ("all", "negatives"),
    "distill_into": DISTILL_INTO,
    "kl_average": ("batch", "nominal"),
    "teacher": ("members", "mean_head"),
    "send": ("items", "all"),
    "score_with": ("global", "group"),
}
"""Allowed values of the plug-in's string settings, checked once before training."""


def logits_training(model: FederatedRecommender, p: Params, items: Params, into: str) -> torch.Tensor:
    """The logits again, with the parameters a loss on them must not train detached.

    ``into`` is ``private`` (shared parameters detached) or ``shared`` (private ones detached).
    """
    specs = model.param_specs()
    train_shared = into == "shared"

    def keep(values: Params) -> Params:
        return {n: t if specs[n].shared == train_shared else t.detach() for n, t in values.items()}

    return model.forward(keep(p), keep(items))


def masked_mean(values: torch.Tensor, mask: torch.Tensor, nominal: int | None = None) -> torch.Tensor:
    """Per-row mean of ``values`` [A, B] over ``mask``, [A] (0 for an empty row).

    With ``nominal`` the sum is divided by that fixed count instead (the configured batch size),
    so that every pair weighs the same whatever the fill of its batch.
    """
    total = (values * mask).sum(1)
    return total / nominal if nominal else total / mask.sum(1).clamp_min(1)


def signature_upload_bytes(model: FederatedRecommender) -> int:
    """Bytes a client adds to its upload for grouping: the head parameters it does not upload anyway.

    FedNCF's tower and output layer are shared (FedAvg already receives them); its user
    embeddings are not. Float32, one signature per client per round.
    """
    specs = model.param_specs()
    return sum(4 * math.prod(specs[n].shape) for n in model.head_params() if not specs[n].shared)


class GFMFR:
    """The plug-in: grouping, fusion and teacher on the server; distillation on the clients."""

    def __init__(self, dataset: Dataset, model: FederatedRecommender, cfg: RunConfig,
                 features: dict[str, np.ndarray] | None = None, masks: dict[str, np.ndarray] | None = None):
        self.cfg = cfg.gfmfr
        for name, allowed in CHOICES.items():  # a bad value fails here, not in round 1
            if getattr(self.cfg, name) not in allowed:
                raise ValueError(f"gfmfr.{name} must be one of {allowed}, got {getattr(self.cfg, name)!r}")
        for name in ("server_steps", "server_every"):
            if getattr(self.cfg, name) < 1:
                raise ValueError(f"gfmfr.{name} must be at least 1, got {getattr(self.cfg, name)}")
        self.seed = cfg.seed
        self.total_rounds = cfg.federation.rounds
        self.batch_size = cfg.federation.batch_size
        self.n_items = dataset.n_items
        if features is None:
            from gfmfr.data.encoders import dataset_features

            content = dataset_features(dataset, self.cfg.modalities)
            features, masks = content.features, content.mask
        missing = [m for m in self.cfg.modalities if m not in features]
        if missing:
            raise ValueError(f"GFMFR needs {missing} features; the dataset has {sorted(features)} (use --content DIR)")
        self.masks = [torch.from_numpy(np.asarray(masks[m], bool)) for m in self.cfg.modalities]
        self.features = [reduce_features(features[m], self.masks[i].numpy(), self.cfg.content_dim, cfg.seed)
                         for i, m in enumerate(self.cfg.modalities)]
        self.grouping = Grouping(dataset.n_users, self.cfg.groups, self.cfg.grouping, self.cfg.pca_variance)
        self.fusion: GroupFusion | None = None
        self.preferences: torch.Tensor | None = None  # [G, n_items], from the last server round
        self.targets: torch.Tensor | None = None  # [G, n_items, d]: C_g of the last server round (0 if empty)
        self.fused: torch.Tensor | None = None  # [G, n_items, d]: Q_g of the last server round (0 if empty)
        self.present = torch.zeros(self.cfg.groups, dtype=torch.bool)  # groups with members in the last round
        self.ratio = torch.full((dataset.n_users,), float("nan"))  # EMA of L_base / L_KL per client
        self._chunks: list[dict[str, Any]] = []
        self._bytes_down = 0  # teacher bytes a client downloads per round (set by the server rounds)
        self._stats = torch.zeros(3)  # this round's sums of distillation weight and KL, and their count
        self.snapshots: list[dict[str, Any]] = []  # per round: participants, 2-D view of signatures, groups

    # ---- client side ----------------------------------------------------------------------
    def client_loss(self, model: FederatedRecommender, p: Params, items: Params, logits: torch.Tensor,
                    base_loss: torch.Tensor, batch: Batch, round_: int) -> torch.Tensor | None:
        if not self.cfg.distill or self.preferences is None or round_ == 0:
            return None
        group = torch.from_numpy(self.grouping.group[batch.users])
        has = group >= 0
        if not has.any():
            return None
        target = self.preferences[group.clamp_min(0)[:, None], batch.items]
        nominal = self.batch_size if self.cfg.kl_average == "nominal" else None
        if self.cfg.distill_into != "all":
            logits = logits_training(model, p, items, self.cfg.distill_into)
        kl = masked_mean(bernoulli_kl(target, logits), distill_mask(batch, self.cfg.distill_on), nominal)
        users = torch.from_numpy(batch.users)
        # FedRAP's base loss can be negative (its -lambda ||D - C||^2 term): a negative ratio
        # would turn the KL term into a reward for disagreeing, so the ratio is clamped at 0
        raw = (base_loss / kl.detach().clamp_min(1e-6)).clamp(0.0, self.cfg.max_ratio)
        ratio = ema(self.ratio[users], raw, self.cfg.ema_decay)
        self.ratio[users] = torch.where(has, ratio, self.ratio[users])
        weight = self.cfg.kl_scale * distill_weight(ratio, round_, self.total_rounds, self.cfg.schedule)
        self._stats += torch.stack([(weight * has).sum(), (kl.detach() * has).sum(), has.sum()])
        return torch.where(has, weight * kl, torch.zeros_like(kl))

    def summary(self, max_snapshots: int = 6) -> dict[str, Any]:
        """The client groups of up to ``max_snapshots`` evenly spaced rounds (2-D PCA of the signatures)."""
        keep = np.unique(np.linspace(0, len(self.snapshots) - 1, max_snapshots).round().astype(int)) \
            if self.snapshots else []
        return {"gfmfr_groups": [
            {"round": s["round"], "users": s["users"].tolist(), "group": s["group"].tolist(),
             "xy": np.round(s["xy"], 4).tolist()} for s in (self.snapshots[k] for k in keep)]}

    def item_tables(self, federation, users: np.ndarray) -> Params:
        """``score_with = "group"``: each client ranks with its group's fused vectors Q_g (the global
        table where it has no group, or its group had no participant in the last round)."""
        if self.cfg.score_with == "global" or self.fused is None:
            return {}
        table = federation.model.item_table
        group = torch.from_numpy(self.grouping.group[users])
        has = (group >= 0) & self.present[group.clamp_min(0)]
        out = federation.state.shared[table].expand(len(users), *federation.state.shared[table].shape).clone()
        out[has] = self.fused[group[has]]
        return {table: out}

    # ---- server side ----------------------------------------------------------------------
    def server_work(self, round_: int) -> bool:
        """Whether ``round_`` runs the server work (every ``server_every`` rounds, from round 0)."""
        return round_ % self.cfg.server_every == 0

    def collect(self, federation, update: LocalUpdate, round_: int) -> None:
        if not self.server_work(round_):
            return
        table = federation.model.item_table
        self._chunks.append({
            "update": LocalUpdate(update.users, {}, {table: update.rows[table]}, update.row_client, update.row_item,
                                  {table: update.decay[table]}),
            "signatures": update.signatures,
            "broadcast": federation.state.shared[table],
            "rows_per_client": np.bincount(update.row_client, minlength=len(update.users)),
        })

    def server_round(self, federation, round_: int) -> dict[str, Any]:
        model = federation.model
        table = model.item_table
        if not self.server_work(round_):  # clients keep the last preferences, but still download
            return {"bytes_down_extra": self._bytes_down}  # those of the items they train on this round
        chunks, self._chunks = self._chunks, []
        t0 = time.perf_counter()
        users = np.concatenate([c["update"].users for c in chunks])
        signatures = torch.cat([c["signatures"] for c in chunks])
        labels = self.grouping.update(users, signatures.numpy(), self.seed + round_)
        self.snapshots.append({"round": round_, "users": users, "xy": self.grouping.view.astype(np.float32),
                               "group": labels})
        t1 = time.perf_counter()

        G = self.cfg.groups
        sums = torch.zeros(G, self.n_items, model.dim)
        start = 0
        for c in chunks:
            n = len(c["update"].users)
            sums += group_sums(c["update"], {table: c["broadcast"]}, labels[start : start + n], G)[table]
            start += n
        counts = torch.from_numpy(np.bincount(labels, minlength=G)).float()
        present = torch.nonzero(counts > 0).flatten()
        targets = sums[present] / counts[present, None, None]
        t2 = time.perf_counter()

        if self.fusion is None or not self.cfg.warm_start:
            self.fusion = GroupFusion(G, model.dim, self.features, self.masks, self.cfg.fusion, self.seed + round_,
                                      self.cfg.item_view, self.cfg.item_view_per_group)
        fusion_loss = fit_fusion(self.fusion, present, targets, self.cfg.server_steps, self.cfg.server_lr,
                                 seed=self.seed + round_)
        t3 = time.perf_counter()
        with torch.no_grad():
            fused = self.fusion(present)
            # rows of `fused` follow `present`; map each member's group to its row
            row_of = torch.full((G,), -1, dtype=torch.long)
            row_of[present] = torch.arange(len(present))
            member_rows = row_of[torch.from_numpy(labels)]
            if self.cfg.teacher == "members":
                prefs = teacher_members(model, signatures, member_rows, fused)
            else:  # mean_head
                head_sums = torch.zeros(len(present), signatures.shape[1]).index_add_(0, member_rows, signatures)
                heads = model.head_from_signature(head_sums / counts[present, None])
                prefs = teacher_mean_head(model, heads, fused)
        self.preferences = torch.full((G, self.n_items), 0.5)
        self.preferences[present] = prefs
        self.targets = torch.zeros(G, self.n_items, model.dim).index_copy_(0, present, targets)
        self.fused = torch.zeros(G, self.n_items, model.dim).index_copy_(0, present, fused)
        self.present = counts > 0
        t4 = time.perf_counter()

        rows = np.concatenate([c["rows_per_client"] for c in chunks])
        w_sum, kl_sum, n = self._stats.tolist()
        self._stats = torch.zeros(3)
        items_bytes = int(4 * rows.mean())
        all_bytes = 4 * self.n_items
        fused_bytes = 4 * self.n_items * model.dim if self.cfg.score_with == "group" else 0
        self._bytes_down = (items_bytes if self.cfg.send == "items" else all_bytes) + fused_bytes
        return {
            "seconds": {"grouping": t1 - t0, "group_targets": t2 - t1, "fusion": t3 - t2, "teacher": t4 - t3},
            "group_sizes": counts.int().tolist(),
            "fusion_loss": fusion_loss,
            "distill_weight_mean": w_sum / n if n else 0.0, "distill_kl_mean": kl_sum / n if n else 0.0,
            "teacher_mean": float(prefs.mean()), "teacher_std_over_items": float(prefs.std(1).mean()),
            "bytes_down_teacher_items": items_bytes, "bytes_down_teacher_all": all_bytes,
            "bytes_down_extra": self._bytes_down,
            "bytes_up_extra": signature_upload_bytes(model),
        }
