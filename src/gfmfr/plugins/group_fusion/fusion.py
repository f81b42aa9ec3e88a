"""Group-aware multimodal fusion, trained on the server (docs/method.md, step 6).

Q_g(i) = Fuse(W_id e_g, W_1 x_1(i), ..., W_M x_M(i)): a learnable group embedding e_g and the
item's frozen content features x_m(i) (any number of modalities, each projected from its own
size, since text and image vectors live in different spaces) are fused by one expert. With
``item_view`` a learnable server-side item embedding joins as one more view (our addition:
on ML-100K the content alone explains about 5% of the variance of the item tables, so a
content-only Q_g(i) is nearly constant across items and so is the teacher built on it).
The experts:

- ``sum``: the sum of the views present;
- ``mlp``: an MLP over the concatenated views, (M+1)d -> 2d -> d (the reference default);
- ``gate``: softmax gates over the views, computed from their concatenation;
- ``attention``: the group view queries the views (scaled dot product);
- ``mixture``: softmax-gated mixture of the four experts above.

A missing modality of an item (no image, say) is masked out of sums, gates and attention and
zeroed in the MLP input. The fusion model is fitted by minimising
mean_{g,i} || Q_g(i) - C_g(i) ||^2 against the group targets C_g.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from gfmfr.data.encoders import standardise

EXPERTS = ("sum", "mlp", "gate", "attention", "mixture")


class GroupFusion(nn.Module):
    """Fused item vectors per group: ``forward(groups) -> [len(groups), n_items, d]``."""

    def __init__(
        self,
        n_groups: int,
        dim: int,
        features: list[torch.Tensor],
        masks: list[torch.Tensor],
        expert: str = "mlp",
        seed: int = 0,
        item_view: bool = False,
        known: torch.Tensor | None = None,
    ):
        super().__init__()
        if expert not in EXPERTS:
            raise ValueError(f"gfmfr.fusion must be one of {EXPERTS}, got {expert!r}")
        torch.manual_seed(seed)
        self.expert = expert
        self.dim = dim
        # frozen content, standardised per column once (features differ in scale across encoders)
        for m, (x, mask) in enumerate(zip(features, masks)):
            self.register_buffer(f"x{m}", standardise(x, mask))
            self.register_buffer(f"m{m}", mask.float())
        self.n_modalities = len(features)
        self.group_emb = nn.Embedding(n_groups, dim)
        nn.init.normal_(self.group_emb.weight, std=0.1)
        self.w_id = nn.Linear(dim, dim)
        self.w_mod = nn.ModuleList([nn.Linear(x.shape[1], dim) for x in features])
        self.n_items = features[0].shape[0]
        self.item_emb = None
        if item_view:  # a server-side item-ID view, learnt with the fusion model
            self.item_emb = nn.Embedding(self.n_items, dim)
            nn.init.normal_(self.item_emb.weight, std=0.1)
        # [n_items] bool: the items training knows (the cold-items split); an unknown item has no
        # item-ID view (it is absent, as a missing modality is). None: every item is known
        self.register_buffer("known", None if known is None else known.bool())
        n_views = self.n_modalities + 1 + int(item_view)
        if expert in ("mlp", "mixture"):
            self.mlp = nn.Sequential(nn.Linear(n_views * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        if expert in ("gate", "mixture"):
            self.gate = nn.Linear(n_views * dim, n_views)
        if expert in ("attention", "mixture"):
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(dim, dim)
        if expert == "mixture":
            self.router = nn.Linear(n_views * dim, 4)

    def view_parts(
        self,
        groups: torch.Tensor,
        items: torch.Tensor | None,
        content: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
        drop: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The projected views before broadcasting, and each one's presence [N] (1: the item has it).

        The group view is [G, 1, d] (the same for every item), each modality's [1, N, d] (the same
        for every group; zero where the item lacks the modality), the item-ID view [1, N, d].
        ``content``, if given, are the standardised features and masks of items outside the catalogue
        (new items: no item-ID view) in place of ``items``. ``drop`` [N] bool, if given, hides the
        item-ID view of those items (training for items without one: DropoutNet's input dropout).
        """
        g = self.w_id(self.group_emb(groups))  # [G, d]
        if content is not None:
            xs, ms = content
        else:
            xs = [getattr(self, f"x{m}") for m in range(self.n_modalities)]
            ms = [getattr(self, f"m{m}") for m in range(self.n_modalities)]
            if items is not None:
                xs, ms = [x[items] for x in xs], [m[items] for m in ms]
        n_items = len(ms[0])
        parts = [g[:, None, :]] + [(self.w_mod[m](x) * mask[:, None])[None] for m, (x, mask) in enumerate(zip(xs, ms))]
        if self.item_emb is not None and content is not None:  # a new item has no ID row
            parts.append(torch.zeros(1, n_items, self.dim))
            ms = ms + [torch.zeros(n_items)]
        elif self.item_emb is not None:
            ids = items if items is not None else torch.arange(n_items)
            if self.known is None and drop is None:
                parts.append(self.item_emb(ids[None]))
                ms = ms + [torch.ones(n_items)]
            else:
                seen = cast(torch.Tensor, self.known)[ids].float() if self.known is not None else torch.ones(n_items)
                if drop is not None:
                    seen = seen * (~drop).float()
                parts.append(self.item_emb(ids[None]) * seen[None, :, None])
                ms = ms + [seen]
        return parts, [torch.ones(n_items)] + ms

    def views(
        self,
        groups: torch.Tensor,
        items: torch.Tensor | None,
        content: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
        drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected views [G, N, V, d] and their presence mask [1, N, V] (the group view is always present)."""
        parts, present = self.view_parts(groups, items, content, drop)
        shape = (len(groups), len(present[0]), self.dim)
        return torch.stack([p.expand(shape) for p in parts], 2), torch.stack(present, 1)[None]

    def _mlp_parts(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The MLP expert without materialising its [G, N, V * d] input: the first layer on a
        concatenation is the sum of its column blocks applied to each view, so the group view is
        projected once per group and the item views once per item (the same function as ``_mlp``)."""
        first, d = cast(nn.Linear, self.mlp[0]), self.dim
        hidden: torch.Tensor = first.bias
        for v, x in enumerate(parts):
            hidden = hidden + x @ first.weight[:, v * d : (v + 1) * d].T
        return self.mlp[2](torch.relu(hidden))

    def _sum(self, views, present):
        return (views * present[..., None]).sum(2)

    def _mlp(self, flat):
        return self.mlp(flat)

    def _gate(self, views, present, flat):
        logits = self.gate(flat).masked_fill(present == 0, -1e9)
        return (F.softmax(logits, -1)[..., None] * views).sum(2)

    def _attention(self, views, present):
        q = self.q(views[:, :, 0])  # the group view asks
        k = self.k(views)
        logits = torch.einsum("gnd,gnvd->gnv", q, k) / math.sqrt(self.dim)
        logits = logits.masked_fill(present == 0, -1e9)
        return (F.softmax(logits, -1)[..., None] * views).sum(2)

    def forward(
        self,
        groups: torch.Tensor,
        items: torch.Tensor | None = None,
        content: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Q_g(i) for ``groups`` x ``items`` (all items by default), or x new items given by their
        ``content`` (standardised features and masks per modality,
        :class:`~gfmfr.data.encoders.ContentReduction`): [G, N, d].
        ``drop``: items whose item-ID view is hidden (:meth:`view_parts`)."""
        if self.expert == "mlp":
            return self._mlp_parts(self.view_parts(groups, items, content, drop)[0])
        views, present = self.views(groups, items, content, drop)
        flat = (views * present[..., None]).flatten(2)
        if self.expert == "sum":
            return self._sum(views, present)
        if self.expert == "mlp":
            return self._mlp(flat)
        if self.expert == "gate":
            return self._gate(views, present, flat)
        if self.expert == "attention":
            return self._attention(views, present)
        experts = torch.stack(
            [
                self._sum(views, present),
                self._mlp(flat),
                self._gate(views, present, flat),
                self._attention(views, present),
            ],
            2,
        )
        return (F.softmax(self.router(flat), -1)[..., None] * experts).sum(2)


def squared_error(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_{g,i} ||Q_g(i) - C_g(i)||^2 of [G, B, d] tensors (the paper's fusion loss)."""
    return ((q - target) ** 2).sum(-1).mean()


def fit_fusion(
    fusion: GroupFusion,
    groups: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    lr: float,
    batch_items: int = 2048,
    seed: int = 0,
    items: torch.Tensor | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = squared_error,
    item_view_dropout: float = 0.0,
) -> float:
    """Minimise ``loss_fn(Q, C)`` (mean ||Q_g(i) - C_g(i)||^2 by default) over ``groups`` x items with
    ``steps`` Adam steps, each on the next ``batch_items`` items of a seeded shuffle (reshuffled when it
    runs out); returns the last step's loss. ``items``, if given, are the only items fitted (the known
    ones: no client trains a cold item's row, so its target is no target). ``item_view_dropout``: the
    share of each step's items fitted without their item-ID view (seeded), so that Q_g(i) from content
    alone, what an item nobody has seen gets, is fitted too."""
    opt = torch.optim.Adam(fusion.parameters(), lr=lr)
    n_items = targets.shape[1] if items is None else len(items)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))

    def shuffle() -> torch.Tensor:
        order = torch.randperm(n_items, generator=gen)
        return order if items is None else items[order]

    order, pos = shuffle(), 0
    for _ in range(steps):
        if pos >= n_items:
            order, pos = shuffle(), 0
        idx = order[pos : pos + batch_items]
        pos += batch_items
        opt.zero_grad()
        drop = torch.rand(len(idx), generator=gen) < item_view_dropout if item_view_dropout > 0 else None
        loss = loss_fn(fusion(groups, idx, drop=drop), targets[:, idx])
        loss.backward()
        opt.step()
    return float(loss.detach())
