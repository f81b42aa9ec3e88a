"""The trained federation a run leaves in ``OUT/model/``, saved at its best validation round.

``model.safetensors`` holds every tensor: the global shared parameters, each client's private
state (as a checkpoint keeps it), the plug-ins' server state (GFMFR: fusion model and groups) and
each user's interacted items (CSR). Its metadata, also written to ``model.json`` for reading, holds
the rest as JSON: the config, the round, the original user and item ids, item titles and the content
features' fingerprint. No pickle. Loading rebuilds the model
from the config and checks the shapes, and the fingerprint against the content the config names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from gfmfr.build import build_run_model
from gfmfr.coldstart.sources import GroupFused, Projected, VectorSource
from gfmfr.config import RunConfig, from_dict, to_dict
from gfmfr.data import load_dataset
from gfmfr.data.dataset import Dataset
from gfmfr.data.encoders import ContentReduction, dataset_features
from gfmfr.federation.checkpoint import federation_tensors, load_federation_tensors
from gfmfr.federation.engine import Federation
from gfmfr.federation.plugin import Plugin
from gfmfr.federation.state import FederationState, save_tensors
from gfmfr.models import build_model
from gfmfr.plugins.group_fusion.server import GFMFRServer
from gfmfr.serving.errors import ModelError

log = logging.getLogger(__name__)

MODEL_DIR = "model"
TENSORS = "model.safetensors"
FORMAT = 1
REDUCTIONS = "content_reductions.safetensors"
"""Where a model folder keeps its catalogue's content reductions, once fitted."""


def content_modalities(cfg: RunConfig) -> tuple[str, ...]:
    """The content modalities a run's computation reads (none for a plain base model)."""
    if cfg.plugin == "gfmfr":
        return tuple(cfg.gfmfr.modalities)
    if cfg.wrapper != "none":
        return tuple(cfg.multimodal.modalities)
    return ()


def content_fingerprint(dataset: Dataset, modalities: tuple[str, ...]) -> str | None:
    """SHA-256 of the content features ``modalities`` of ``dataset`` (None when there are none)."""
    if not modalities:
        return None

    content = dataset_features(dataset, modalities)
    h = hashlib.sha256()
    for m in sorted(set(modalities) & set(content.features)):
        x = np.ascontiguousarray(content.features[m], np.float32)
        h.update(m.encode() + str(x.shape).encode() + x.tobytes())
        h.update(np.ascontiguousarray(content.mask[m], bool).tobytes())
    return h.hexdigest()


def title_of(text: str | None, item_id: str) -> str:
    """A short title from an item's text: up to its first "(year)" (ML-100K's and our content's texts
    start with "Title (year)."), else its first sentence, else the item id."""
    if not text:
        return str(item_id)
    dated = re.match(r"(.+?\(\d{4}\))", text)  # "E.T. the Extra-Terrestrial (1982). Genres: ..."
    return (dated.group(1) if dated else text.split(". ")[0])[:100]


def interactions(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Every user's interacted items (training, validation and test), CSR: (indptr, sorted items)."""
    users = np.concatenate([dataset.train_users, np.arange(dataset.n_users), np.arange(dataset.n_users)])
    items = np.concatenate([dataset.train_items, dataset.valid_items, dataset.test_items])
    keys = np.unique(users[items >= 0] * dataset.n_items + items[items >= 0])  # by user, then item
    indptr = np.searchsorted(keys // dataset.n_items, np.arange(dataset.n_users + 1)).astype(np.int64)
    return indptr, (keys % dataset.n_items).astype(np.int64)


class ModelSaver:
    """Writes a trained federation to ``folder`` (tensors atomically, then ``model.json``); what does not
    change from round to round (ids, titles, interactions, config) is prepared once."""

    def __init__(self, folder: Path, d: Dataset, cfg: RunConfig, fingerprint: str | None):
        self.folder = Path(folder)
        indptr, items = interactions(d)
        self.fixed = {"interactions/indptr": torch.from_numpy(indptr), "interactions/items": torch.from_numpy(items)}
        self.info = {
            "format": FORMAT,
            "config": to_dict(cfg),
            "content_fingerprint": fingerprint,
            "users": [str(u) for u in d.user_ids],
            "items": [str(i) for i in d.item_ids],
            "titles": [title_of(d.item_text[i] if d.item_text else None, d.item_ids[i]) for i in range(d.n_items)],
        }

    def write(self, round_: int, tensors: dict[str, torch.Tensor], plugins: list[dict[str, Any]]) -> None:
        """Save the federation's tensors (:func:`~gfmfr.federation.checkpoint.federation_tensors`' layout)
        and the plug-ins' JSON state as they stood after ``round_``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        info = {**self.info, "round": round_, "plugins": plugins}
        save_tensors(
            {**tensors, **self.fixed}, self.folder / TENSORS, metadata={"gfmfr": json.dumps(info, default=str)}
        )
        tmp = self.folder / "model.json.part"
        tmp.write_text(json.dumps(info, indent=1, default=str))
        tmp.replace(self.folder / "model.json")

    def saver_of(self, fed: Federation) -> Callable[[int], None]:
        """The in-process engine's ``on_best``: save ``fed`` as it stands after the round."""
        return lambda round_: self.write(round_, *federation_tensors(fed.state, fed.plugins))


def save_model(folder: Path, fed: Federation, round_: int, fingerprint: str | None) -> None:
    """Write ``fed`` as it stands after ``round_`` to ``folder``."""
    ModelSaver(folder, fed.dataset, fed.cfg, fingerprint).saver_of(fed)(round_)


@dataclass
class SavedModel:
    """A loaded federation, ready to score its users."""

    cfg: RunConfig
    round: int
    state: FederationState
    """The global shared parameters and every client's private state."""
    plugins: tuple[Plugin, ...]
    user_ids: list[str]
    item_ids: list[str]
    titles: list[str]
    indptr: np.ndarray
    interacted: np.ndarray
    """Each user's interacted items, CSR over users (``indptr``)."""
    fingerprint: str | None
    info: dict[str, Any]
    dataset: Dataset | None = None
    """The run's data, where loading needed it (plug-ins, wrappers): its content serves new items."""
    folder: Path | None = None
    """The model folder it was loaded from."""

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @functools.cached_property
    def cold_source(self) -> VectorSource | None:
        """Where a cold-items run's held-out items get their vectors, built once: GFMFR's fused vectors
        or MM-X's projection (:mod:`gfmfr.coldstart.sources`); None without a cold split, a content model
        or (GFMFR) a fusion model yet."""

        if self.dataset is None or self.dataset.cold_items is None:
            return None
        source: VectorSource
        if self.cfg.plugin == "gfmfr":
            if self.gfmfr_server.fusion is None:
                return None
            source = GroupFused(self.gfmfr_server, self.dataset, self.state.model.dim)
        elif self.cfg.wrapper == "mmx":
            source = Projected(self.state.model, self.dataset)
        else:
            return None
        source.refresh(self.state.shared)
        return source

    @functools.cached_property
    def content_reductions(self) -> dict[str, ContentReduction]:
        """The catalogue's content reductions by modality, fitted or read once
        (:func:`catalogue_reductions`)."""

        return catalogue_reductions(self)

    @property
    def gfmfr_server(self) -> GFMFRServer:
        """GFMFR's server half (grouping, fusion model); a :class:`ModelError` for a model without GFMFR."""
        server = self.plugins[0].server if self.plugins else None
        if not isinstance(server, GFMFRServer):
            raise ModelError(f"this model has no GFMFR server half (plugin = {self.cfg.plugin!r})")
        return server

    def user_index(self, user_id: str) -> int:
        """The contiguous index of original user id ``user_id``."""
        if not hasattr(self, "_users"):
            self._users = {u: k for k, u in enumerate(self.user_ids)}
        if str(user_id) not in self._users:
            raise ModelError(f"user {user_id!r} is not in this model ({self.n_users} users)")
        return self._users[str(user_id)]


def load_model(run: str | Path, dataset: Dataset | None = None, check_content: bool = True) -> SavedModel:
    """The model saved in ``run`` (a run folder, or its ``model/`` folder). ``dataset``: the run's data,
    if at hand (needed for plug-ins' server halves and the content check; loaded from the config
    otherwise, only when needed). Shapes are checked against the rebuilt model, and with
    ``check_content`` the fingerprint against the content features the config names."""

    folder = Path(run)
    if (folder / MODEL_DIR / TENSORS).exists():
        folder = folder / MODEL_DIR
    path = folder / TENSORS
    if not path.exists():
        raise ModelError(f"{run}: no saved model ({MODEL_DIR}/{TENSORS}); a run saves one at its best validation round")
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            info = json.loads(f.metadata()["gfmfr"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise ModelError(f"{path}: not a readable saved model ({exc})") from exc
    if info.get("format") != FORMAT:
        raise ModelError(f"{path}: format {info.get('format')!r}, this version reads {FORMAT}")
    cfg = from_dict(info["config"], where=f"{path}: config")
    n_items, n_users = len(info["items"]), len(info["users"])

    if dataset is None and (cfg.plugin != "none" or cfg.wrapper != "none" or cfg.data.split == "cold-items"):
        dataset = load_dataset(cfg.data)
    if dataset is not None and (dataset.n_items, dataset.n_users) != (n_items, n_users):
        raise ModelError(
            f"{path}: saved for {n_users} users and {n_items} items; the data has "
            f"{dataset.n_users} and {dataset.n_items}"
        )
    if dataset is not None and check_content and info["content_fingerprint"] is not None:
        now = content_fingerprint(dataset, content_modalities(cfg))
        if now != info["content_fingerprint"]:
            raise ModelError(
                f"{path}: saved with other content features than {cfg.data.content or cfg.data.dataset} "
                f"gives now (fingerprint {info['content_fingerprint'][:12]} against {str(now)[:12]})"
            )
    if dataset is None:
        model, plugins = build_model(n_items, cfg.model), cast(tuple[Plugin, ...], ())
    else:
        model, plugins = build_run_model(dataset, cfg)
    state = FederationState(model, n_users, cfg.seed)
    for name, value in state.shared.items():
        got = tensors.get(f"shared/{name}")
        if got is None or got.shape != value.shape:
            raise ModelError(
                f"{path}: shared parameter {name!r} has shape {None if got is None else list(got.shape)}; "
                f"the model built from the config has {list(value.shape)}"
            )
    load_federation_tensors(state, plugins, tensors, info["plugins"])
    return SavedModel(
        cfg,
        int(info["round"]),
        state,
        plugins,
        info["users"],
        info["items"],
        info["titles"],
        tensors["interactions/indptr"].numpy(),
        tensors["interactions/items"].numpy(),
        info["content_fingerprint"],
        info,
        dataset,
        folder,
    )


def content_source(saved: SavedModel) -> tuple[tuple[str, ...], int | None]:
    """The modalities and reduced size of the run's content model; a :class:`ModelError` if it has none."""
    cfg = saved.cfg
    if cfg.plugin == "gfmfr":
        return tuple(cfg.gfmfr.modalities), cfg.gfmfr.content_dim
    if cfg.wrapper == "mmx":
        return tuple(cfg.multimodal.modalities), cfg.multimodal.content_dim
    raise ModelError(
        'new items need a model that builds item vectors from content: GFMFR (plugin = "gfmfr") '
        f'or MM-X (wrapper = "mmx"); this one is {cfg.wrapper}/{cfg.model.name}/{cfg.plugin}'
    )


def catalogue_reductions(saved: SavedModel) -> dict[str, ContentReduction]:
    """Each modality's reduction of the catalogue's content (PCA and standardisation, as the server fitted
    them for training): read from the model folder (``REDUCTIONS``, checked against the content
    fingerprint), else fitted and kept there, so that later processes skip the PCA. Callers use the
    cached :attr:`SavedModel.content_reductions`."""

    modalities, dim = content_source(saved)
    key = {"fingerprint": str(saved.fingerprint), "modalities": ",".join(modalities), "dim": str(dim)}
    path = saved.folder / REDUCTIONS if saved.folder is not None else None
    if path is not None and path.exists():
        with safe_open(path, "pt") as f:
            kept = f.metadata() or {}
        if all(kept.get(k) == v for k, v in key.items()):
            tensors = load_file(path)
            return {
                m: ContentReduction.from_tensors(
                    {k[len(m) + 1 :]: v for k, v in tensors.items() if k.startswith(m + "/")}
                )
                for m in modalities
                if f"{m}/mean" in tensors
            }
    if saved.dataset is None:
        raise ModelError("new items need the run's data (its catalogue content fits the reduction)")
    catalogue = dataset_features(saved.dataset, modalities)
    reductions = {
        m: ContentReduction.fit(catalogue.features[m], catalogue.mask[m], dim, saved.cfg.seed)
        for m in modalities
        if m in catalogue.features
    }
    if path is not None:
        try:
            save_tensors(
                {f"{m}/{k}": v.contiguous() for m, r in reductions.items() for k, v in r.tensors().items()},
                path,
                metadata=key,
            )
        except OSError as exc:
            log.warning("could not keep the content reductions in %s (%s); they are refitted next time", path, exc)
    return reductions
