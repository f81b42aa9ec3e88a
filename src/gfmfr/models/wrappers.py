"""Content-aware baselines that wrap any base model X: MM-X and FedVLR.

Both replace X's shared item table ``e_i`` (the :attr:`item_table` hook), in every forward
pass, by an item vector built from ``e_i`` and the item's frozen content features ``x_m(i)``
(one per modality, PCA-reduced and standardised on the server; public, like the item ids).
X's forward, loss, regulariser and head are used unchanged, so the wrapper plugs into
every base model. The content features enter as *constant* item tables: the engine gathers
their rows like any table and never trains, uploads or aggregates them.

- :class:`MMX` (the simplest multimodal baseline): ``v_i = e_i + sum_m x_m(i) W_m`` with shared
  projections W_m, trained by the clients and averaged by FedAvg.
- :class:`FedVLR` (Li et al., AAAI 2026, arXiv 2410.08478, earlier FedMR): bi-level fusion.
  Shared fusion operators build several views of each item from ``e_i`` and the projected
  content ``p_m(i) = x_m(i) W_m`` (``sum``: e + sum_m p_m; ``mlp``: e + MLP([e; p_1..p_M]), one
  hidden layer of width d; ``gate``: e + sum_m sigmoid(g_m . [e; p_1..p_M]) p_m, a scalar gate per
  modality). The views depend only on shared parameters and public content, so a server can
  pre-compute and broadcast them; computing them in the client's forward pass is the same
  arithmetic. A small private router per client
  mixes them for each item: ``v_ui = sum_k softmax(R_u [v_1(i); ..; v_K(i)] + r_u)_k v_k(i)``.
  R_u and r_u start at zero (an even mixture) and never leave the client.

The projections start at zero and the router at an even mixture, so both start as X itself.
"""

from __future__ import annotations

import functools
import operator
from abc import abstractmethod

import numpy as np
import torch

from gfmfr.config import MultimodalConfig
from gfmfr.data.encoders import present_modalities, reduce_features, standardise
from gfmfr.models.base import FederatedRecommender, Params, ParamSpec

FEDVLR_VIEWS = ("sum", "mlp", "gate")


def content_tables(
    features: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    modalities: tuple[str, ...],
    dim: int | None,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Per modality of ``modalities`` the data has, the PCA-reduced, standardised [n_items, k] features
    (missing items are zero rows)."""
    out = {}
    for m in present_modalities(modalities, features, "the content baselines"):
        mask = np.asarray(masks[m], bool)
        out[m] = standardise(reduce_features(features[m], mask, dim, seed), torch.from_numpy(mask))
    return out


class ContentAugmented(FederatedRecommender):
    """Base model X with its shared item table replaced by a content-aware item vector (:meth:`fuse`)."""

    kind = "content"

    def __init__(self, base: FederatedRecommender, content: dict[str, torch.Tensor], cfg: MultimodalConfig):
        super().__init__(base.n_items, base.cfg)
        self.base = base
        self.mm = cfg
        self.name = f"{base.name}+{self.kind}"
        self.item_table = base.item_table
        self.default_lrs = base.default_lrs
        self.modalities = list(content)
        self._content = {f"content.{m}": x for m, x in content.items()}
        for x in content.values():
            if len(x) != base.n_items:
                raise ValueError(f"content has {len(x)} rows, the dataset {base.n_items} items")

    # ---- the one hook a variant overrides -------------------------------------------------------
    @abstractmethod
    def fuse(self, p: Params, ids: torch.Tensor, content: list[torch.Tensor]) -> torch.Tensor:
        """Item vectors [A, B, d] from the ID rows ``ids`` [A, B, d] and the content rows [A, B, k_m]."""

    def extra_specs(self) -> dict[str, ParamSpec]:
        """Parameters the variant adds to X's."""
        return {}

    # ---- the contract, delegated to X ---------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        specs = dict(self.base.param_specs())
        for name, x in self._content.items():
            specs[name] = ParamSpec(
                (x.shape[1],), shared=True, lr=0.0, weight_decay=0.0, item_table=True, constant=True
            )
        specs.update(self.extra_specs())
        return specs

    def constant_table(self, name: str) -> torch.Tensor:
        return self._content[name]

    def forward(self, p: Params, items: Params) -> torch.Tensor:
        content = [items[f"content.{m}"] for m in self.modalities]
        fused = self.fuse(p, items[self.item_table], content)
        return self.base.forward(p, {**items, self.item_table: fused})

    def regularizer(self, p: Params, items: Params, mask: torch.Tensor, round_: int) -> torch.Tensor | None:
        return self.base.regularizer(p, items, mask, round_)

    def head_params(self) -> list[str]:
        return self.base.head_params()

    def head_score(self, p: Params, vectors: torch.Tensor) -> torch.Tensor:
        return self.base.head_score(p, vectors)

    def head_weights(self, p: Params) -> torch.Tensor | None:
        return self.base.head_weights(p)

    def _projection_specs(self) -> dict[str, ParamSpec]:
        return {
            f"proj.{m}": ParamSpec(
                (x.shape[1], self.dim),
                shared=True,
                lr=self.mm.content_lr,
                weight_decay=self.cfg.weight_decay,
                init="zeros",
            )
            for m, x in zip(self.modalities, self._content.values())
        }

    def _project(self, p: Params, content: list[torch.Tensor]) -> list[torch.Tensor]:
        """p_m = x_m W_m per modality, [A, B, d]."""
        return [torch.matmul(x, p[f"proj.{m}"]) for m, x in zip(self.modalities, content)]

    def _per_item(self, fn, p: Params, ids: torch.Tensor, content: list[torch.Tensor]) -> torch.Tensor:
        """``fn(p, ids, content)`` -> [A, B, ...], where ``fn`` reads only shared parameters. When the item
        rows and the shared parameters are one value broadcast over the clients (stride 0: scoring with
        the global tables), it runs once, on the first client's slices, and is broadcast back."""
        if ids.stride(0) != 0:  # training gathers each client's own rows
            return fn(p, ids, content)
        shared = [t for n, t in p.items() if n in self.kinds.shared_dense]
        if not all(t.stride(0) == 0 for t in [*content, *shared]):
            return fn(p, ids, content)
        out = fn({n: t[:1] for n, t in p.items()}, ids[:1], [x[:1] for x in content])
        return out.expand(ids.shape[0], *out.shape[1:])


class MMX(ContentAugmented):
    """MM-X: projected content added to X's shared item table, ``v_i = e_i + sum_m x_m(i) W_m``."""

    kind = "mmx"

    def extra_specs(self) -> dict[str, ParamSpec]:
        return self._projection_specs()

    def fuse(self, p: Params, ids: torch.Tensor, content: list[torch.Tensor]) -> torch.Tensor:
        return self._per_item(lambda p, ids, content: ids + sum(self._project(p, content)), p, ids, content)

    def content_vectors(
        self, shared: Params, items: torch.Tensor | None = None, content: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``sum_m x_m(i) W_m`` [N, d] under the global projections ``shared``: the vector of an item
        whose ID row no client has trained (a cold item), from its content alone; of catalogue
        ``items``, or of new items given by their standardised ``content`` rows, one per modality."""
        if content is None:
            content = [self._content[f"content.{m}"][items] for m in self.modalities]
        content = [x[None] for x in content]
        return functools.reduce(operator.add, self._project({n: t[None] for n, t in shared.items()}, content))[0]


class FedVLR(ContentAugmented):
    """FedVLR: shared multi-view fusion of ID and content, mixed per item by a private router."""

    kind = "fedvlr"

    def __init__(self, base: FederatedRecommender, content: dict[str, torch.Tensor], cfg: MultimodalConfig):
        super().__init__(base, content, cfg)
        unknown = [v for v in cfg.views if v not in FEDVLR_VIEWS]
        if unknown or not cfg.views:
            raise ValueError(f"multimodal.views must be a non-empty subset of {FEDVLR_VIEWS}, got {cfg.views}")
        self.views = tuple(cfg.views)

    def extra_specs(self) -> dict[str, ParamSpec]:
        d, wd, lr = self.dim, self.cfg.weight_decay, self.mm.content_lr
        n_in = (1 + len(self.modalities)) * d
        specs = self._projection_specs()
        if "mlp" in self.views:
            specs["mlp.w1"] = ParamSpec((n_in, d), shared=True, lr=lr, weight_decay=wd, init="xavier")
            specs["mlp.b1"] = ParamSpec((d,), shared=True, lr=lr, weight_decay=wd, init="zeros")
            specs["mlp.w2"] = ParamSpec((d, d), shared=True, lr=lr, weight_decay=wd, init="zeros")
        if "gate" in self.views:
            specs["gate.w"] = ParamSpec(
                (n_in, len(self.modalities)), shared=True, lr=lr, weight_decay=wd, init="xavier"
            )
            specs["gate.b"] = ParamSpec((len(self.modalities),), shared=True, lr=lr, weight_decay=wd, init="zeros")
        K = len(self.views)
        specs["router.w"] = ParamSpec((K * d, K), shared=False, lr=self.mm.router_lr, weight_decay=wd, init="zeros")
        specs["router.b"] = ParamSpec((K,), shared=False, lr=self.mm.router_lr, weight_decay=wd, init="zeros")
        return specs

    def view_vectors(self, p: Params, ids: torch.Tensor, content: list[torch.Tensor]) -> torch.Tensor:
        """The server-side views of every item, [A, B, K, d]."""
        proj = self._project(p, content)
        joint = torch.cat([ids, *proj], -1)
        out = []
        for view in self.views:
            if view == "sum":
                out.append(ids + sum(proj))
            elif view == "mlp":
                hidden = torch.relu(torch.matmul(joint, p["mlp.w1"]) + p["mlp.b1"][:, None, :])
                out.append(ids + torch.matmul(hidden, p["mlp.w2"]))
            else:  # gate
                gates = torch.sigmoid(torch.matmul(joint, p["gate.w"]) + p["gate.b"][:, None, :])
                out.append(ids + sum(gates[..., m, None] * x for m, x in enumerate(proj)))
        return torch.stack(out, 2)

    def router_weights(self, p: Params, views: torch.Tensor) -> torch.Tensor:
        """Each client's mixture over the views of each item, [A, B, K]."""
        logits = torch.matmul(views.flatten(2), p["router.w"]) + p["router.b"][:, None, :]
        return torch.softmax(logits, -1)

    def fuse(self, p: Params, ids: torch.Tensor, content: list[torch.Tensor]) -> torch.Tensor:
        views = self._per_item(self.view_vectors, p, ids, content)  # the server-side views: shared only
        return torch.einsum("abk,abkd->abd", self.router_weights(p, views), views)


CONTENT_WRAPPERS: dict[str, type[ContentAugmented]] = {"mmx": MMX, "fedvlr": FedVLR}


def wrap(
    base: FederatedRecommender, plugin: str, content: dict[str, torch.Tensor], cfg: MultimodalConfig
) -> ContentAugmented:
    """X wrapped as MM-X or FedVLR."""
    return CONTENT_WRAPPERS[plugin](base, content, cfg)
