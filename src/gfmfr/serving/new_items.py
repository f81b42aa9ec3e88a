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

from gfmfr.coldstart.sources import score_vectors
from gfmfr.data.encoders import (
    encode_images,
    encode_texts,
)
from gfmfr.data.errors import DataError
from gfmfr.data.sources import read_items_csv
from gfmfr.models.wrappers import MMX
from gfmfr.serving.errors import ModelError
from gfmfr.serving.saved import SavedModel, content_source, title_of

log = logging.getLogger(__name__)


@dataclass
class NewItems:
    """New items' ids, titles and raw content features (per modality, with presence masks)."""

    ids: list[str]
    titles: list[str]
    features: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)


def read_new_items(path: str | Path, saved: SavedModel) -> NewItems:
    """``items.csv`` (``item_id`` and ``text`` and/or ``image``, image paths relative to its folder), encoded
    with the run's encoders. An id the model already has is a :class:`DataError` naming its line."""

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
            raise ModelError(
                f"new items' {m} features have {x.shape[1]} columns, the catalogue's "
                f"{reduction.raw_dim}: another encoder?"
            )
        if not mask.any():
            x = np.zeros((len(new), reduction.raw_dim), np.float32)
        content.append(reduction.apply(x, mask))
        present.append(torch.from_numpy(np.asarray(mask, bool)).float())
    with torch.no_grad():
        if saved.cfg.plugin == "gfmfr":
            server = saved.gfmfr_server
            if server.fusion is None:
                raise ModelError("this GFMFR model was saved before its first server round: no fusion model yet")
            return server.fusion(torch.arange(saved.cfg.gfmfr.groups), content=(content, present))
        model = saved.state.model
        if not isinstance(model, MMX):
            raise ModelError(f"new items need MM-X's projection; this model is {model.name}")
        return model.content_vectors(saved.state.shared, content=content)[None]


def new_item_scores(saved: SavedModel, users: np.ndarray, vectors: torch.Tensor) -> torch.Tensor:
    """Logits [U, N] of the new items' ``vectors`` under each user's own head (its group's table for GFMFR)."""

    users = np.asarray(users, np.int64)
    group = saved.gfmfr_server.grouping.group[users] if len(vectors) > 1 else None
    return score_vectors(saved.state.model, saved.state.client_params(users), vectors, group)
