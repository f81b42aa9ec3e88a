"""Items added at serving time, known only by their content.

The server encodes a new item's text and image with the encoders the run's content came from,
reduces them as it reduced the catalogue's (:class:`~gfmfr.data.encoders.ContentReduction`) and
builds the item's vector from content alone: GFMFR's fused Q_g(i) for the user's group (the fusion
model with no item-ID view), or MM-X's projection ``sum_m x_m(i) W_m``. Each user scores the
vectors with its own head (:meth:`~gfmfr.models.base.FederatedRecommender.head_score`), as its
client scores known items, so new and known items rank together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gfmfr.data.encoders import ContentReduction
from gfmfr.data.errors import DataError
from gfmfr.serving.errors import ModelError
from gfmfr.serving.saved import SavedModel, title_of

log = logging.getLogger(__name__)

REDUCTIONS = "content_reductions.safetensors"
"""Where a model folder keeps its catalogue's content reductions, once fitted."""


@dataclass
class NewItems:
    """New items' ids, titles and raw content features (per modality, with presence masks)."""

    ids: list[str]
    titles: list[str]
    features: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)


def content_source(saved: SavedModel) -> tuple[tuple[str, ...], int | None]:
    """The modalities and reduced size of the run's content model; a :class:`ModelError` if it has none."""
    cfg = saved.cfg
    if cfg.plugin == "gfmfr":
        return tuple(cfg.gfmfr.modalities), cfg.gfmfr.content_dim
    if cfg.wrapper == "mmx":
        return tuple(cfg.multimodal.modalities), cfg.multimodal.content_dim
    raise ModelError("new items need a model that builds item vectors from content: GFMFR (plugin = \"gfmfr\") "
                     f"or MM-X (wrapper = \"mmx\"); this one is {cfg.wrapper}/{cfg.model.name}/{cfg.plugin}")


def read_new_items(path: str | Path, saved: SavedModel) -> NewItems:
    """``items.csv`` (``item_id`` and ``text`` and/or ``image``, image paths relative to its folder), encoded
    with the run's encoders. An id the model already has is a :class:`DataError` naming its line."""
    from gfmfr.data.encoders import encode_images, encode_texts
    from gfmfr.data.sources import read_items_csv

    path = Path(path)
    raw = read_items_csv(path)
    known = set(saved.item_ids)
    for k, item in enumerate(raw.item_ids):
        if item in known:
            raise DataError(path, f"item {item!r} is already in the model's catalogue", line=2 + k, field="item_id")
    modalities, _ = content_source(saved)
    features, masks = {}, {}
    for m in modalities:
        if m == "text" and raw.text is not None:
            features[m], masks[m], _ = encode_texts(raw.text)
        elif m == "image" and raw.image is not None:
            features[m], masks[m], _ = encode_images(raw.image)
        else:  # no such column: the items lack the modality
            features[m], masks[m] = np.zeros((len(raw.item_ids), 1), np.float32), np.zeros(len(raw.item_ids), bool)
    if not any(mask.any() for mask in masks.values()):
        raise DataError(path, f"no new item has any of the model's content ({', '.join(modalities)})")
    titles = [title_of(raw.text[k] if raw.text else None, i) for k, i in enumerate(raw.item_ids)]
    return NewItems(list(raw.item_ids), titles, features, masks)


def catalogue_reductions(saved: SavedModel) -> dict[str, ContentReduction]:
    """Each modality's reduction of the catalogue's content (PCA and standardisation, as the server fitted
    them for training): read from the model folder (``REDUCTIONS``, checked against the content
    fingerprint), else fitted and kept there, so that later processes skip the PCA. Callers use the
    cached :attr:`SavedModel.content_reductions`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from gfmfr.data.encoders import dataset_features
    from gfmfr.federation.state import save_tensors

    modalities, dim = content_source(saved)
    key = {"fingerprint": str(saved.fingerprint), "modalities": ",".join(modalities), "dim": str(dim)}
    path = saved.folder / REDUCTIONS if saved.folder is not None else None
    if path is not None and path.exists():
        with safe_open(path, "pt") as f:
            kept = f.metadata() or {}
        if all(kept.get(k) == v for k, v in key.items()):
            tensors = load_file(path)
            return {m: ContentReduction.from_tensors({k[len(m) + 1:]: v for k, v in tensors.items()
                                                      if k.startswith(m + "/")})
                    for m in modalities if f"{m}/mean" in tensors}
    if saved.dataset is None:
        raise ModelError("new items need the run's data (its catalogue content fits the reduction)")
    catalogue = dataset_features(saved.dataset, modalities)
    reductions = {m: ContentReduction.fit(catalogue.features[m], catalogue.mask[m], dim, saved.cfg.seed)
                  for m in modalities if m in catalogue.features}
    if path is not None:
        try:
            save_tensors({f"{m}/{k}": v.contiguous() for m, r in reductions.items() for k, v in r.tensors().items()},
                         path, metadata=key)
        except OSError as exc:
            log.warning("could not keep the content reductions in %s (%s); they are refitted next time", path, exc)
    return reductions


def new_item_vectors(saved: SavedModel, new: NewItems) -> torch.Tensor:
    """The new items' vectors from content alone: [G, N, d] (GFMFR, one table per group) or [1, N, d] (MM-X)."""
    modalities, _ = content_source(saved)
    reductions = saved.content_reductions
    content, present = [], []
    for m in modalities:
        if m not in reductions:
            continue
        reduction = reductions[m]
        x, mask = new.features[m], new.masks[m]
        if mask.any() and x.shape[1] != reduction.raw_dim:
            raise ModelError(f"new items' {m} features have {x.shape[1]} columns, the catalogue's "
                             f"{reduction.raw_dim}: another encoder?")
        if not mask.any():
            x = np.zeros((len(new), reduction.raw_dim), np.float32)
        content.append(reduction.apply(x, mask))
        present.append(torch.from_numpy(np.asarray(mask, bool)).float())
    with torch.no_grad():
        if saved.cfg.plugin == "gfmfr":
            server = saved.plugins[0].server
            if server.fusion is None:
                raise ModelError("this GFMFR model was saved before its first server round: no fusion model yet")
            return server.fusion(torch.arange(saved.cfg.gfmfr.groups), content=(content, present))
        return saved.state.model.content_vectors(saved.state.shared, content=content)[None]


def new_item_scores(saved: SavedModel, users: np.ndarray, vectors: torch.Tensor) -> torch.Tensor:
    """Logits [U, N] of the new items' ``vectors`` under each user's own head (its group's table for GFMFR)."""
    from gfmfr.coldstart.sources import score_vectors

    users = np.asarray(users, np.int64)
    group = saved.plugins[0].server.grouping.group[users] if len(vectors) > 1 else None
    return score_vectors(saved.state.model, saved.state.client_params(users), vectors, group)
