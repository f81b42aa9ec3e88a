"""GFMFR's server half (docs/method.md, steps 4-7 and 9).

After FedAvg in a server round t (every ``server_every`` rounds, from round 0): group the
participants by their uploaded head signatures (:mod:`.grouping`), average each group's
uploaded shared item tables into the targets C_g, fit the group fusion model Q_g(i) to them and
the public content (:mod:`.fusion`), and score every fused vector with the members' heads:
p_g(i) = mean over members u of sigmoid(head_u(Q_g(i))) (:func:`teacher_members`, over the landmark
members beyond ``gfmfr.exact_grouping_max`` participants; the paper's mean head,
:func:`teacher_mean_head`, is ``teacher = "mean_head"``). From round t + 1 each client
of group g receives p_g, its :class:`~gfmfr.federation.messages.Hints` row, with the shared
parameters; the client half (:mod:`.client`) distils towards it. Before that broadcast the server
moves each row of the global item table towards the item's fused vector from content alone, by
kappa / (kappa + t_i) with t_i the participants that trained the row (:meth:`GFMFRServer.move_shared`,
``gfmfr.content_prior``).

It sees only what clients upload (their trained item-table rows and, in server rounds, their
head signatures) and the public content. It touches the base model only through its hooks:
``item_table``, ``head_signature`` / ``head_from_signature`` and ``head_score``. Changes from the
reference code, each with its reason and figure: docs/method.md, 'Deviations'.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gfmfr.config import RunConfig
from gfmfr.data.dataset import Dataset
from gfmfr.data.encoders import dataset_features, present_modalities, reduce_features
from gfmfr.federation.aggregation import group_sums
from gfmfr.federation.messages import GroupedUploads, Hints, LocalUpdate, PluginReport
from gfmfr.federation.plugin import ServerHalf
from gfmfr.models.base import FederatedRecommender, Params
from gfmfr.plugins.group_fusion.client import DistillTerm
from gfmfr.plugins.group_fusion.fusion import GroupFusion, fit_fusion, squared_error
from gfmfr.plugins.group_fusion.grouping import Grouping, landmark_rows
from gfmfr.privacy.dp import CentralNoise, generator

STREAM_GROUPS = 4
"""The noise stream of the group sums under central DP (:mod:`gfmfr.privacy.dp` uses 1 to 3)."""

log = logging.getLogger(__name__)


def teacher_mean_head(model: FederatedRecommender, heads: Params, fused: torch.Tensor) -> torch.Tensor:
    """p_g(i) = sigmoid(head_g(Q_g(i))) with group-mean heads [G, ...] and fused vectors [G, n_items, d]."""
    return torch.sigmoid(model.head_score(heads, fused))


def teacher_members(
    model: FederatedRecommender, signatures: torch.Tensor, labels: torch.Tensor, fused: torch.Tensor, block: int = 256
) -> torch.Tensor:
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


def score_error(
    model: FederatedRecommender, heads: Params, rows: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ``score`` fusion loss: mean over members k and items i of (head_k(Q(i)) - head_k(C(i)))^2, with
    the members' ``heads`` [K, ...], each of fusion row ``rows[k]``, and Q, C [G', B, d]. Errors count as
    the members score them: along the directions their heads read, not equally in every dimension.

    With heads linear in the item vector (:meth:`~gfmfr.models.base.FederatedRecommender.head_weights`)
    the same mean is e^T M_r e over the rows' errors e = Q(i) - C(i), with M_r the sum of w_k w_k^T over
    row r's members: d x d per row instead of scoring every member."""
    weights = model.head_weights(heads)
    if weights is not None:
        n_rows = int(rows.max()) + 1 if len(rows) else 0
        moments = torch.zeros(n_rows, weights.shape[1], weights.shape[1])
        moments.index_add_(0, rows, weights[:, :, None] * weights[:, None, :])
        scale = 1.0 / max(len(rows), 1)

        def linear(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            e = (q - c)[:n_rows]
            return torch.einsum("rbi,rij,rbj->", e, moments, e) * (scale / e.shape[1])

        return linear

    def loss(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return ((model.head_score(heads, q[rows]) - model.head_score(heads, c[rows])) ** 2).mean()

    return loss


def sample_members(labels: torch.Tensor, n_rows: int, per_row: int, gen: torch.Generator) -> torch.Tensor:
    """``per_row`` members (indices into ``labels``) of each of fusion rows 0 .. n_rows - 1, drawn
    uniformly with replacement (seeded); a row without members gets none."""
    out = []
    for r in range(n_rows):
        members = torch.nonzero(labels == r).flatten()
        if len(members):
            out.append(members[torch.randint(len(members), (per_row,), generator=gen)])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def signature_upload_bytes(model: FederatedRecommender) -> int:
    """Bytes a client adds to its upload for grouping: the head parameters it does not upload anyway.

    FedNCF's tower and output layer are shared (FedAvg already receives them); its user
    embeddings are not. Float32, one signature per client per round.
    """
    specs = model.param_specs()
    return sum(4 * math.prod(specs[n].shape) for n in model.head_params() if not specs[n].shared)


class HeldUploads:
    """The item-table uploads a GFMFR server round holds until it has grouped every participant: in
    memory up to ``limit`` bytes, beyond that in temporary safetensors files (one per chunk), read
    back one at a time and deleted by :meth:`clear`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_memory = 0
        self.folder: tempfile.TemporaryDirectory[str] | None = None
        self.files = 0

    def keep(self, update: LocalUpdate, table: str) -> LocalUpdate | Path:
        """``update`` itself, or the file it now waits in."""
        size = update.rows[table].nbytes + update.row_client.nbytes + update.row_item.nbytes
        if self.in_memory + size <= self.limit:
            self.in_memory += size
            return update
        if self.folder is None:
            self.folder = tempfile.TemporaryDirectory(prefix="gfmfr-held-")
        path = Path(self.folder.name) / f"chunk{self.files}.safetensors"
        self.files += 1
        tensors = {
            "users": torch.from_numpy(np.asarray(update.users, np.int64)),
            "rows": update.rows[table].contiguous(),
            "row_client": torch.from_numpy(np.asarray(update.row_client, np.int64)),
            "row_item": torch.from_numpy(np.asarray(update.row_item, np.int64)),
            "decay": update.decay[table].contiguous(),
        }
        save_file(tensors, str(path))
        return path

    def get(self, held: LocalUpdate | Path, table: str) -> LocalUpdate:
        if isinstance(held, LocalUpdate):
            return held
        t = load_file(str(held))
        held.unlink()
        users, rows, row_client, row_item = t["users"], t["rows"], t["row_client"], t["row_item"]
        return LocalUpdate(users.numpy(), {}, {table: rows}, row_client.numpy(), row_item.numpy(), {table: t["decay"]})

    def clear(self) -> None:
        self.in_memory, self.files = 0, 0
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None


class GFMFRServer(ServerHalf):
    """Grouping, group fusion and the teacher's preferences, on the server."""

    def __init__(
        self,
        dataset: Dataset,
        model: FederatedRecommender,
        cfg: RunConfig,
        features: dict[str, np.ndarray] | None = None,
        masks: dict[str, np.ndarray] | None = None,
    ):
        self.cfg = cfg.gfmfr
        for name in ("server_steps", "server_every"):
            if getattr(self.cfg, name) < 1:
                raise ValueError(f"gfmfr.{name} must be at least 1, got {getattr(self.cfg, name)}")
        self.seed = cfg.seed
        self.model = model
        self.dense = cfg.privacy.mode != "off" or cfg.federation.upload == "dense"
        """Whether clients send every row of the item table (under DP, or ``federation.upload = "dense"``)."""
        self.n_items = dataset.n_items
        if features is None:
            content = dataset_features(dataset, self.cfg.modalities)
            features, masks = content.features, content.mask
        if masks is None:  # features given without masks: every item has each
            masks = {m: np.ones(len(x), bool) for m, x in features.items()}
        self.modalities = present_modalities(self.cfg.modalities, features, "GFMFR")
        """The modalities fused: those of ``gfmfr.modalities`` the data has."""
        self.masks = [torch.from_numpy(np.asarray(masks[m], bool)) for m in self.modalities]
        self.features = [
            reduce_features(features[m], self.masks[i].numpy(), self.cfg.content_dim, cfg.seed)
            for i, m in enumerate(self.modalities)
        ]
        warm = dataset.warm_items
        self.known = (
            None
            if warm is None
            else torch.zeros(self.n_items, dtype=torch.bool).index_fill_(0, torch.from_numpy(warm), True)
        )
        """The items training knows (None: all); the fusion model is fitted to them alone."""
        self.grouping = Grouping(
            dataset.n_users,
            self.cfg.groups,
            self.cfg.grouping,
            self.cfg.pca_variance,
            self.cfg.landmarks,
            self.cfg.exact_grouping_max,
        )
        self.fusion: GroupFusion | None = None
        self.preferences: torch.Tensor | None = None  # [G, n_items], from the last server round
        self.targets: torch.Tensor | None = None  # [G, n_items, d]: C_g of the last server round (0 if empty)
        self.fused: torch.Tensor | None = None  # [G, n_items, d]: Q_g of the last server round (0 if empty)
        self.pull: tuple[torch.Tensor, torch.Tensor] | None = None
        """After a server round: the content vectors [n_items, d] the item table moves to, and how far [n_items]."""
        self._chunks: list[dict[str, Any]] = []
        self._held = HeldUploads(cfg.runtime.hold_mb * 2**20)
        self._touches = torch.zeros(0)
        """Per item, the participants of this server round that trained its row (the content prior's t_i)."""
        self._secure: GroupedUploads | None = None
        """Under secure aggregation: the server round's participants, their groups and the groups' sums."""
        self.broadcast = torch.zeros(0)
        """The item table this round's clients started from."""
        self._stats = np.zeros(3)  # sums of the clients' distillation weight, KL and steps since the last server round
        self.noise: CentralNoise | None = None  # central DP: group sums and sizes are noised
        self.snapshots: list[dict[str, Any]] = []  # per round: participants, 2-D view of signatures, groups

    def server_work(self, round_: int) -> bool:
        """Whether ``round_`` runs the server work (every ``server_every`` rounds, from round 0)."""
        return round_ % self.cfg.server_every == 0

    def wants_signatures(self, round_: int) -> bool:
        return self.server_work(round_)

    def use_noise(self, noise: CentralNoise) -> None:
        self.noise = noise

    def noised_sums(self, round_: int) -> int:
        """Each server round releases (through the fused vectors and the teacher) the groups' sums of
        clipped updates and the groups' sizes: two Gaussian mechanisms."""
        return 2 if self.server_work(round_) else 0

    def hints(self, users: np.ndarray, round_: int) -> Hints:
        """Each client's group preferences p_g of the last server round (none before its group has any)."""
        if self.preferences is None:
            return Hints.none(len(users))
        return Hints(self.preferences, self.grouping.group[users])

    def observe_figures(self, figures: dict[str, float], round_: int) -> None:
        if figures:
            self._stats += [figures[k] for k in DistillTerm.figures]

    @property
    def groups(self) -> int:
        return self.cfg.groups

    def group(self, users: np.ndarray, signatures: torch.Tensor, round_: int) -> np.ndarray:
        """Group this server round's participants by their head signatures; their group labels."""
        labels = self.grouping.update(users, signatures.numpy(), self.seed + round_)
        self.snapshots.append(
            {"round": round_, "users": users, "xy": self.grouping.view.astype(np.float32), "group": labels}
        )
        return labels

    def observe_groups(self, grouped: GroupedUploads, broadcast: Params) -> None:
        self._secure = grouped
        self.broadcast = broadcast[self.model.item_table]

    def observe(self, update: LocalUpdate, broadcast: Params, round_: int) -> None:
        table = self.model.item_table
        self.broadcast = broadcast[table]
        if not self._chunks:
            self._touches = torch.zeros(self.n_items)
        self._touches += torch.bincount(torch.from_numpy(update.row_item), minlength=self.n_items).float()
        rows, decay = {table: update.rows[table]}, {table: update.decay[table]}
        held = LocalUpdate(update.users, {}, rows, update.row_client, update.row_item, decay)
        self._chunks.append(
            {
                "users": update.users,
                "update": self._held.keep(held, table),
                "signatures": update.signatures,
                "broadcast": broadcast[table],
            }
        )

    def end_round(self, model: FederatedRecommender, round_: int) -> PluginReport:
        hint_bytes = 4 * self.n_items if self.preferences is not None else 0
        if not self.server_work(round_):  # clients keep distilling towards the last preferences
            return PluginReport(bytes_down=hint_bytes)
        table = model.item_table
        chunks, self._chunks = [c for c in self._chunks if len(c["users"])], []
        secure, self._secure = self._secure, None
        if not chunks and (secure is None or not len(secure.users)):
            # every upload was rejected (or none came): nothing to group; the last hint stands
            log.warning(
                "GFMFR server round %d: no accepted upload, the groups and preferences stay as they were", round_
            )
            self._held.clear()
            return PluginReport(bytes_down=hint_bytes)
        t0 = time.perf_counter()
        G = self.cfg.groups
        if secure is not None:  # grouped in the clear, the groups' tables summed under secure aggregation
            users, signatures, labels, sums, counts = (
                secure.users,
                secure.signatures,
                secure.labels,
                secure.sums,
                secure.counts,
            )
            t1 = t0
        else:
            users = np.concatenate([c["users"] for c in chunks])
            signatures = torch.cat([c["signatures"] for c in chunks])
            labels = self.group(users, signatures, round_)
            t1 = time.perf_counter()
            sums = torch.zeros(G, self.n_items, model.dim)
            start = 0
            for c in chunks:
                n = len(c["users"])
                update = self._held.get(c["update"], table)
                sums += group_sums(update, {table: c["broadcast"]}, labels[start : start + n], G)[table]
                start += n
            self._held.clear()
            counts = torch.from_numpy(np.bincount(labels, minlength=G)).float()
        if self.noise is not None:  # central DP: noised sums of the (clipped) updates and noised sizes
            gen = generator(self.seed, STREAM_GROUPS, round_)
            broadcast = self.broadcast
            delta = sums - counts[:, None, None] * broadcast[None]
            delta += self.noise.std * torch.randn(delta.shape, generator=gen)
            counts = (counts + self.noise.std / self.noise.clip * torch.randn(G, generator=gen)).round().clamp_min(0)
            sums = counts[:, None, None] * broadcast[None] + delta
        present = torch.nonzero(counts > 0).flatten()
        targets = sums[present] / counts[present, None, None]
        t2 = time.perf_counter()

        if self.fusion is None:  # then warm-started: the steps add up over server rounds
            self.fusion = GroupFusion(
                G,
                model.dim,
                self.features,
                self.masks,
                self.cfg.fusion,
                self.seed + round_,
                self.cfg.item_view,
                self.known,
            )
        # rows of `targets` and `fused` follow `present`; map each member's group to its row
        row_of = torch.full((G,), -1, dtype=torch.long)
        row_of[present] = torch.arange(len(present))
        member_rows = row_of[torch.from_numpy(labels)]
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = squared_error
        if self.cfg.fusion_loss == "score":
            picked = sample_members(
                member_rows, len(present), self.cfg.score_members, torch.Generator().manual_seed(self.seed + round_)
            )
            loss_fn = score_error(model, model.head_from_signature(signatures[picked]), member_rows[picked])
        fusion_loss = fit_fusion(
            self.fusion,
            present,
            targets,
            self.cfg.server_steps,
            self.cfg.server_lr,
            seed=self.seed + round_,
            items=None if self.known is None else torch.nonzero(self.known).flatten(),
            loss_fn=loss_fn,
            item_view_dropout=self.cfg.item_view_dropout,
        )
        t3 = time.perf_counter()
        with torch.no_grad():
            fused = self.fusion(present)
            if self.cfg.teacher == "members":
                voters = self.teacher_voters(member_rows, round_)
                prefs = teacher_members(model, signatures[voters], member_rows[voters], fused)
            else:  # mean_head
                head_sums = torch.zeros(len(present), signatures.shape[1]).index_add_(0, member_rows, signatures)
                heads = model.head_from_signature(head_sums / counts[present, None])
                prefs = teacher_mean_head(model, heads, fused)
            if self.cfg.content_prior > 0:
                if secure is not None:  # summed over the clients under secure aggregation
                    touches = secure.touches.float()
                elif self.dense:  # every row is sent: which ones a client trained is not known
                    touches = torch.full((self.n_items,), float(len(users)))
                else:
                    touches = self._touches
                self.pull = (
                    self.content_vectors(present, counts[present]),
                    self.cfg.content_prior / (self.cfg.content_prior + touches),
                )
        self.preferences = torch.full((G, self.n_items), 0.5)
        self.preferences[present] = prefs
        self.targets = torch.zeros(G, self.n_items, model.dim).index_copy_(0, present, targets)
        self.fused = torch.zeros(G, self.n_items, model.dim).index_copy_(0, present, fused)
        t4 = time.perf_counter()

        w_sum, kl_sum, seen = self._stats.tolist()
        self._stats = np.zeros(3)
        return PluginReport(
            seconds={"grouping": t1 - t0, "group_targets": t2 - t1, "fusion": t3 - t2, "teacher": t4 - t3},
            bytes_up=signature_upload_bytes(model),
            bytes_down=hint_bytes,
            figures={
                "group_sizes": counts.int().tolist(),
                "fusion_loss": fusion_loss,
                "distill_weight_mean": w_sum / seen if seen else 0.0,
                "distill_kl_mean": kl_sum / seen if seen else 0.0,
                "teacher_mean": float(prefs.mean()),
                "teacher_std_over_items": float(prefs.std(1).mean()),
                "content_share": float(self.pull[1].mean()) if self.pull is not None else 0.0,
            },
        )

    def teacher_voters(self, member_rows: torch.Tensor, round_: int) -> torch.Tensor:
        """The participants whose heads score the teacher's p_g: all of them up to
        ``gfmfr.exact_grouping_max``; beyond, the landmark participants the grouping used, plus every
        member of a group none of them is in, which bounds the teacher's cost (members x items) as the
        number of participants grows (an unbiased estimate of each group's mean preference)."""
        n = len(member_rows)
        if not self.grouping.uses_landmarks(n):
            return torch.arange(n)
        picked = torch.zeros(n, dtype=torch.bool)
        picked[torch.from_numpy(landmark_rows(n, self.cfg.landmarks, self.seed + round_))] = True
        unseen = torch.ones(int(member_rows.max()) + 1, dtype=torch.bool)
        unseen[member_rows[picked]] = False
        return torch.nonzero(picked | unseen[member_rows]).flatten()

    def content_vectors(self, groups: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """[n_items, d]: each item's vector from its content alone, the ``sizes``-weighted mean over
        ``groups`` of the fused Q_g(i) without the item-ID view (the content prior's centre)."""
        weights = (sizes / sizes.sum())[:, None, None]
        hidden = torch.ones(self.n_items, dtype=torch.bool)
        if self.fusion is None:
            raise RuntimeError("the content prior needs the fusion model of a server round")
        return (weights * self.fusion(groups, drop=hidden)).sum(0)

    def move_shared(self, shared: Params, round_: int) -> Params:
        """The item table moved towards the content vectors of this server round, each row by its share
        (``gfmfr.content_prior``; the items training knows: a cold item's row stays as it is)."""
        if self.pull is None:
            return shared
        (content, share), self.pull = self.pull, None
        if self.known is not None:
            share = share * self.known
        table = self.model.item_table
        rows = shared[table]
        return {**shared, table: rows + share[:, None] * (content - rows)}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {
            "group": torch.from_numpy(self.grouping.group.copy()),
            "view": torch.from_numpy(np.ascontiguousarray(self.grouping.view, np.float64)),
            "stats": torch.from_numpy(self._stats.copy()),
        }
        for name in ("preferences", "targets", "fused"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        if self.fusion is not None:
            tensors.update({f"fusion/{k}": v for k, v in self.fusion.state_dict().items()})
        for k, snap in enumerate(self.snapshots):
            tensors.update(
                {f"snapshot{k}/{f}": torch.from_numpy(np.ascontiguousarray(snap[f])) for f in ("users", "xy", "group")}
            )
        return tensors, {"fusion": self.fusion is not None, "snapshots": [s["round"] for s in self.snapshots]}

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        self.grouping.group = tensors["group"].numpy().copy()
        self.grouping.view = tensors["view"].numpy().copy()
        self._stats = tensors["stats"].numpy().copy()
        for name in ("preferences", "targets", "fused"):
            setattr(self, name, tensors.get(name))
        if info["fusion"]:
            self.fusion = GroupFusion(
                self.cfg.groups,
                self.model.dim,
                self.features,
                self.masks,
                self.cfg.fusion,
                0,
                self.cfg.item_view,
                self.known,
            )
            self.fusion.load_state_dict({k[len("fusion/") :]: v for k, v in tensors.items() if k.startswith("fusion/")})
        self.snapshots = [
            {"round": r, **{f: tensors[f"snapshot{k}/{f}"].numpy() for f in ("users", "xy", "group")}}
            for k, r in enumerate(info["snapshots"])
        ]

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor | None:
        """Q_g(``items``) of every group [G, N, d] from content (and the item-ID view where the item is
        known) alone: the vectors of items no client has seen; None before the first server round."""
        if self.fusion is None:
            return None
        with torch.no_grad():
            return self.fusion(torch.arange(self.cfg.groups), items)

    def summary(self, max_snapshots: int = 6) -> dict[str, Any]:
        """The client groups of up to ``max_snapshots`` evenly spaced rounds (2-D PCA of the signatures)."""
        keep: Any = (
            np.unique(np.linspace(0, len(self.snapshots) - 1, max_snapshots).round().astype(int))
            if self.snapshots
            else []
        )
        return {
            "gfmfr_groups": [
                {
                    "round": s["round"],
                    "users": s["users"].tolist(),
                    "group": s["group"].tolist(),
                    "xy": np.round(s["xy"], 4).tolist(),
                }
                for s in (self.snapshots[k] for k in keep)
            ]
        }
