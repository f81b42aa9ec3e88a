"""DP-FedAvg's mechanisms (McMahan et al., "Learning differentially private recurrent language
models", ICLR 2018), on the engine's uploads.

- :func:`clip_updates`: each client's whole update (upload minus the broadcast, every shared
  parameter, item tables whole) is scaled to L2 norm at most C. The rows a client did not train
  moved only by weight decay, so scaling keeps the rows-plus-decay form exactly.
- :func:`add_local_noise` (``privacy.mode = "local"``): the client adds Gaussian noise to every
  coordinate of its dense upload; the result has every item row.
- :class:`CentralNoise` (``privacy.mode = "central"``): the server adds Gaussian noise to the sum of
  clipped updates and divides by the expected number of participants, a fixed denominator, so that
  one client's presence changes the sum by at most C.
- :func:`noise_signatures`: a head signature (GFMFR) is clipped and noised on the client.

Every draw is seeded by (seed, round, client) or (seed, round): a run stays reproducible. A
deployment that needs the noise to be unpredictable should seed from a secret.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from gfmfr.config import PrivacyConfig
from gfmfr.federation.messages import LocalUpdate, Params
from gfmfr.federation.validation import update_norms

STREAM_UPDATE, STREAM_SIGNATURE, STREAM_SERVER = 1, 2, 3


def generator(*key: int) -> torch.Generator:
    """A torch generator seeded by a tuple of non-negative integers (seed, stream, round, ...)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0]))


def clip_updates(update: LocalUpdate, broadcast: Params, clip: float) -> LocalUpdate:
    """``update`` with each client's update scaled by min(1, clip / its norm); non-finite ones stay so."""
    norms = torch.from_numpy(update_norms(update, broadcast))
    # a clipped update's norm may come out a rounding error above the bound: not clipped again
    scale = torch.where(norms > clip * (1 + 1e-5), clip / norms, torch.ones_like(norms)).float()
    owner = torch.from_numpy(update.row_client)
    items = torch.from_numpy(update.row_item)
    rows = {}
    for name, r in update.rows.items():
        g = broadcast[name].index_select(0, items)
        s = scale.index_select(0, owner).view(-1, *([1] * (r.dim() - 1)))
        rows[name] = g + s * (r - g)
    shared = {}
    for name, value in update.shared.items():
        g = broadcast[name].expand_as(value)
        shared[name] = g + scale.view(-1, *([1] * (value.dim() - 1))) * (value - g)
    decay = {name: 1 + scale * (d - 1) for name, d in update.decay.items()}
    return LocalUpdate(
        update.users,
        shared,
        rows,
        update.row_client,
        update.row_item,
        decay,
        update.num_samples,
        update.loss,
        update.signatures,
        update.metrics,
    )


def add_local_noise(update: LocalUpdate, broadcast: Params, std: float, seed: int, round_: int) -> LocalUpdate:
    """Each client's dense upload (:meth:`LocalUpdate.dense`) plus N(0, std^2) on every coordinate."""
    dense = update.dense(broadcast)
    C = len(update.users)
    shared = {n: v.clone() for n, v in dense.shared.items()}
    rows = {n: r.view(C, -1, *r.shape[1:]) for n, r in dense.rows.items()}  # [C, n_items, ...], in place
    for c, user in enumerate(update.users):
        gen = generator(seed, STREAM_UPDATE, round_, int(user))
        for name in sorted(shared):
            shared[name][c] += std * torch.randn(shared[name][c].shape, generator=gen)
        for name in sorted(rows):
            rows[name][c] += std * torch.randn(rows[name][c].shape, generator=gen)
    return replace(dense, shared=shared, decay={n: torch.ones(C) for n in update.decay})


def noise_signatures(
    signatures: torch.Tensor, users: np.ndarray, clip: float, noise: float, seed: int, round_: int
) -> torch.Tensor:
    """Signatures [C, k] clipped to L2 norm ``clip``, plus N(0, (noise * clip)^2) per coordinate."""
    norms = torch.linalg.vector_norm(signatures, dim=1, keepdim=True)
    out = signatures * torch.where(norms > clip, clip / norms, torch.ones_like(norms))
    for c, user in enumerate(users):
        gen = generator(seed, STREAM_SIGNATURE, round_, int(user))
        out[c] += noise * clip * torch.randn(out.shape[1], generator=gen)
    return out


def privatise(
    update: LocalUpdate, broadcast: Params, cfg: PrivacyConfig, noise_multiplier: float | None, seed: int, round_: int
) -> LocalUpdate:
    """What the clients of ``update`` send under ``cfg``: under DP clipped (the server clips again in
    central mode), plus noise in local mode; signatures clipped and noised with ``signature_noise > 0``."""
    if cfg.mode != "off":
        update = clip_updates(update, broadcast, cfg.clip)
    if cfg.mode == "local":
        assert noise_multiplier is not None
        update = add_local_noise(update, broadcast, noise_multiplier * cfg.clip, seed, round_)
    if update.signatures is not None and cfg.signature_noise > 0:
        update.signatures = noise_signatures(
            update.signatures, update.users, cfg.signature_clip, cfg.signature_noise, seed, round_
        )
    return update


@dataclass(frozen=True)
class CentralNoise:
    """The server's half of central DP-FedAvg: noise on the sum of clipped updates, a fixed denominator."""

    clip: float
    """The L2 bound C the server clips every upload to (an honest client has clipped already)."""
    std: float
    """Noise std on each coordinate of the sum: noise_multiplier * clip."""
    expected_clients: float
    """The denominator: client_fraction * (1 - dropout) * clients."""
    names: tuple[str, ...]
    """The shared parameters clients upload (``model.kinds.shared_dense + shared_tables``)."""
    seed: int

    def average(self, sums: Params, total: float, broadcast: Params, round_: int) -> Params:
        """broadcast + (sum of updates + noise) / expected_clients for every uploaded parameter
        (``sums``: the clients' summed uploads, ``total``: how many; noised even when nobody came)."""
        gen = generator(self.seed, STREAM_SERVER, round_)
        out = dict(broadcast)
        for name in sorted(self.names):
            g = broadcast[name]
            delta = sums[name] - total * g if name in sums else torch.zeros_like(g)
            out[name] = g + (delta + self.std * torch.randn(g.shape, generator=gen)) / self.expected_clients
        return out
