"""The one contract every federated base recommender implements.

Parameters live outside the model, as plain tensors that the federation engine owns:

- a *per-client* parameter has shape ``[A, *spec.shape]`` (one slice per client being trained
  or scored, A >= 1);
- an *item-table* parameter is gathered by the engine for the items a batch scores and reaches
  the model as ``[A, B, *spec.shape]``.

A model declares, through :meth:`param_specs`, which parameters are shared (uploaded and
averaged) and which stay private on the client, and each parameter's optimiser group (SGD
learning rate and weight decay). It defines the forward pass (logits) and the base loss.
Because the leading client dimension is always there, the same code trains one client (A = 1,
as a Flower ClientApp does) or every client of a round at once.

GFMFR and other plug-ins touch a model only through three hooks: :attr:`item_table` (the name
of the shared item table), :meth:`head_signature` (the prediction-head parameters used for
grouping) and :meth:`head_score` (the score of an arbitrary item vector under a head).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gfmfr.config import ModelConfig

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a base model."""

    shape: tuple[int, ...]
    """Shape per client (for an item table: shape of one row)."""
    shared: bool
    """Uploaded and aggregated by the server (True) or private to the client (False)."""
    lr: float
    """SGD learning rate of this parameter's optimiser group."""
    weight_decay: float
    """SGD weight decay of this parameter's optimiser group."""
    item_table: bool = False
    """One row per item; the engine gathers only the rows a batch scores."""
    init: str = "normal"
    """``normal`` (std ``init_std``), ``zeros``, ``ones`` or ``xavier`` (for [in, out] matrices)."""
    same_init: bool = True
    """Private parameters only: every client starts from the same value (else an independent draw)."""
    constant: bool = False
    """Public side information (frozen content features): an item table the engine gathers like
    any other but never trains, uploads or aggregates. Its value is :meth:`FederatedRecommender.constant_table`."""

    def __post_init__(self) -> None:
        if self.constant and not (self.shared and self.item_table):
            raise ValueError("a constant parameter must be a shared item table")
        if not 0 <= self.lr * self.weight_decay < 1:
            raise ValueError(
                f"lr * weight_decay must lie in [0, 1) (SGD decay factor 1 - lr * wd), "
                f"got lr={self.lr}, weight_decay={self.weight_decay}"
            )

    @property
    def trainable(self) -> bool:
        """Trained by the clients (everything but constants)."""
        return not self.constant


@dataclass(frozen=True)
class ParamKinds:
    """A model's parameters sorted by kind, built once from its specs (:attr:`FederatedRecommender.kinds`);
    every name list keeps the specs' order. The engine, the client step, the stores and the
    centralised bound read these lists instead of branching on the spec flags."""

    specs: dict[str, ParamSpec]
    shared_dense: tuple[str, ...]
    """Shared, not an item table (FedNCF's tower): uploaded whole and averaged."""
    shared_tables: tuple[str, ...]
    """Shared, trainable item tables: a client uploads the rows it trained."""
    constant_tables: tuple[str, ...]
    """Public content tables: gathered like any table, never trained, uploaded or averaged."""
    private_dense: tuple[str, ...]
    """Private, not an item table (user vectors, personal heads): never leave the client."""
    private_tables: tuple[str, ...]
    """Private item tables (FedRAP's D_u): start at zero, kept as the rows a client trained."""

    @staticmethod
    def from_specs(specs: dict[str, ParamSpec]) -> ParamKinds:
        def names(keep) -> tuple[str, ...]:
            return tuple(n for n, s in specs.items() if keep(s))

        return ParamKinds(
            specs=dict(specs),
            shared_dense=names(lambda s: s.shared and not s.item_table),
            shared_tables=names(lambda s: s.shared and s.item_table and not s.constant),
            constant_tables=names(lambda s: s.constant),
            private_dense=names(lambda s: not s.shared and not s.item_table),
            private_tables=names(lambda s: not s.shared and s.item_table),
        )

    def _ordered(self, *groups: tuple[str, ...]) -> tuple[str, ...]:
        members = set().union(*groups)
        return tuple(n for n in self.specs if n in members)

    @property
    def dense(self) -> tuple[str, ...]:
        """One value per client, [A, *shape] in a batch: shared or private."""
        return self._ordered(self.shared_dense, self.private_dense)

    @property
    def tables(self) -> tuple[str, ...]:
        """One row per item, gathered for the items a batch scores, [A, B, *shape]."""
        return self._ordered(self.shared_tables, self.constant_tables, self.private_tables)

    @property
    def shared(self) -> tuple[str, ...]:
        """Held by the server and broadcast (constants included)."""
        return self._ordered(self.shared_dense, self.shared_tables, self.constant_tables)

    @property
    def uploaded(self) -> tuple[str, ...]:
        """Sent back by clients and averaged."""
        return self._ordered(self.shared_dense, self.shared_tables)

    @property
    def private(self) -> tuple[str, ...]:
        """Never leave the client."""
        return self._ordered(self.private_dense, self.private_tables)

    @property
    def trainable(self) -> tuple[str, ...]:
        """Trained by the clients: everything but the constants."""
        return self._ordered(self.uploaded, self.private)


def init_tensor(spec: ParamSpec, leading: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    """A freshly initialised tensor of shape ``leading + spec.shape``."""
    shape = leading + spec.shape
    if spec.init == "zeros":
        return torch.zeros(shape)
    if spec.init == "ones":
        return torch.ones(shape)
    if spec.init == "normal":
        return torch.randn(shape, generator=gen) * std
    if spec.init == "xavier":
        fan_in, fan_out = spec.shape[-2], spec.shape[-1]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    raise ValueError(f"unknown init {spec.init!r}")


def mlp_specs(prefix: str, sizes: list[int], shared: bool, lr: float, wd: float) -> dict[str, ParamSpec]:
    """Weight ``[in, out]`` and bias ``[out]`` specs of a ReLU MLP with layer sizes ``sizes``."""
    specs = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        specs[f"{prefix}{i}.w"] = ParamSpec((a, b), shared, lr, wd, init="xavier")
        specs[f"{prefix}{i}.b"] = ParamSpec((b,), shared, lr, wd, init="zeros")
    return specs


class _RowDot(torch.autograd.Function):
    """``out[a, b] = vectors[a, b] . weight[a]`` with a hand-written backward.

    ``einsum("abd,ad->ab")`` runs as three batched matrix-vector products (one forward, two
    backward), which CPU BLAS handles poorly at these shapes; the elementwise forms below take
    about half the time, and the products are a third of a round for the dot-product models.
    """

    @staticmethod
    def forward(ctx, vectors, weight):  # type: ignore[override]
        ctx.save_for_backward(vectors, weight)
        if vectors.dim() == 3 and vectors.stride(0) == 0:
            # one table broadcast to every client (scoring with the global item table): one matrix
            # product, about 10x faster than the elementwise form at evaluation's shapes
            return weight @ vectors[0].T
        return torch.linalg.vecdot(vectors, weight.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        vectors, weight = ctx.saved_tensors
        grad_vectors = grad.unsqueeze(2) * weight.unsqueeze(1) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.unsqueeze(1), vectors).squeeze(1) if ctx.needs_input_grad[1] else None
        return grad_vectors, grad_weight


def rowdot(vectors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-client dot products: vectors [A, B, d] with weight [A, d] -> [A, B]."""
    return _RowDot.apply(vectors, weight)


def mlp_apply(
    p: Params,
    prefix: str,
    n_layers: int,
    x: torch.Tensor,
    first: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Per-client MLP on ``x`` [A, B, in], layers ``start .. n_layers - 1``; ReLU after every layer.

    ``first`` [A, out0], if given, is added to layer 0's pre-activation (used to add a
    user-vector term computed once per client instead of once per item).
    """
    for i in range(start, n_layers):
        w, b = p[f"{prefix}{i}.w"], p[f"{prefix}{i}.b"]
        x = torch.matmul(x, w) + b[:, None, :]
        if i == 0 and first is not None:
            x = x + first[:, None, :]
        x = F.relu(x)
    return x


class FederatedRecommender(ABC):
    """A base model: parameter specs, forward, base loss, and the hooks GFMFR needs."""

    name: str
    item_table: str = "item"
    """Name of the shared item embedding table (the GFMFR group target is its member average)."""

    default_lrs: dict[str, float] = {"lr": 1.0, "item_lr": 30.0, "private_item_lr": 0.5}
    """Learning rates used where the config leaves them None (tuned on ML-100K validation)."""

    def __init__(self, n_items: int, cfg: ModelConfig):
        self.n_items = n_items
        self.cfg = cfg
        self.dim = cfg.dim
        lrs = self.default_lrs
        self.lr = cfg.lr if cfg.lr is not None else lrs["lr"]
        self.item_lr = cfg.item_lr if cfg.item_lr is not None else lrs["item_lr"]
        self.private_item_lr = (
            cfg.private_item_lr if cfg.private_item_lr is not None else lrs.get("private_item_lr", 0.0)
        )

    @abstractmethod
    def param_specs(self) -> dict[str, ParamSpec]:
        """Every parameter, shared or private, with its optimiser group."""

    def constant_table(self, name: str) -> torch.Tensor:
        """Value [n_items, *shape] of the constant item table ``name`` (models without constants have none)."""
        raise KeyError(f"{type(self).__name__} has no constant table {name!r}")

    @abstractmethod
    def forward(self, p: Params, items: Params) -> torch.Tensor:
        """Logits [A, B]: ``p`` holds per-client parameters [A, ...], ``items`` the gathered rows [A, B, ...]."""

    def regularizer(self, p: Params, items: Params, mask: torch.Tensor, round_: int) -> torch.Tensor | None:
        """Extra per-client terms of the base loss, [A] (none by default)."""
        return None

    def base_loss(
        self, p: Params, items: Params, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, round_: int
    ) -> torch.Tensor:
        """Per-client mean BCE on sigmoid scores plus the model's regularisers, [A]."""
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        loss = (bce * mask).sum(1) / mask.sum(1).clamp_min(1)
        reg = self.regularizer(p, items, mask, round_)
        return loss if reg is None else loss + reg

    # ---- hooks for GFMFR ------------------------------------------------------------------
    @abstractmethod
    def head_params(self) -> list[str]:
        """Names of every parameter :meth:`head_score` reads: the grouping signature and the teacher's head."""

    def head_signature(self, p: Params) -> torch.Tensor:
        """Flattened head parameters per client, [A, k]."""
        return torch.cat([p[n].reshape(p[n].shape[0], -1) for n in self.head_params()], 1)

    def head_from_signature(self, signature: torch.Tensor) -> Params:
        """Inverse of :meth:`head_signature`: [K, k] -> head parameters [K, ...]."""
        specs = self.param_specs()
        out, start = {}, 0
        for name in self.head_params():
            size = math.prod(specs[name].shape)
            out[name] = signature[:, start : start + size].reshape(len(signature), *specs[name].shape)
            start += size
        return out

    @abstractmethod
    def head_score(self, p: Params, vectors: torch.Tensor) -> torch.Tensor:
        """Logits [A, B] of item vectors [A, B, d] (standing in for the item table's rows) under each head."""

    def head_weights(self, p: Params) -> torch.Tensor | None:
        """For a head linear in the item vector (``head_score = w . v + b``), each head's w, [A, d]; None
        (the default) for any other head. Lets GFMFR's score-space fusion loss work with d x d second
        moments instead of scoring every member."""
        return None

    # ---- derived ------------------------------------------------------------------------------
    @functools.cached_property
    def kinds(self) -> ParamKinds:
        """The parameters sorted by kind, built once from :meth:`param_specs`."""
        return ParamKinds.from_specs(self.param_specs())

    def shared_names(self) -> list[str]:
        """Parameters uploaded to and averaged by the server."""
        return list(self.kinds.uploaded)

    def private_names(self) -> list[str]:
        """Parameters that never leave the client."""
        return list(self.kinds.private)

    def upload_bytes(self) -> int:
        """Bytes of one client's shared parameters (float32, dense item tables)."""
        k = self.kinds
        return sum(4 * math.prod(k.specs[n].shape) * (self.n_items if n in k.shared_tables else 1) for n in k.uploaded)
