"""The model and plug-ins a configuration names, built from the data: one place that a run, a Flower
node (its client halves alone) and a saved model all build from."""

from __future__ import annotations

from gfmfr.config import RunConfig
from gfmfr.data.dataset import Dataset
from gfmfr.data.encoders import dataset_features
from gfmfr.federation.plugin import LossTerm, Plugin
from gfmfr.models import FederatedRecommender, build_model
from gfmfr.models.wrappers import CONTENT_WRAPPERS, content_tables, wrap
from gfmfr.plugins import group_fusion


def content_model(dataset: Dataset, model: FederatedRecommender, cfg: RunConfig) -> FederatedRecommender:
    """``model`` wrapped as MM-X or FedVLR (``cfg.wrapper``), with the dataset's content features."""
    mm = cfg.multimodal
    features = dataset_features(dataset, mm.modalities)
    content = content_tables(features.features, features.mask, mm.modalities, mm.content_dim, cfg.seed)
    return wrap(model, cfg.wrapper, content, mm)


def build_client_model(dataset: Dataset, cfg: RunConfig) -> FederatedRecommender:
    """The base model of ``cfg``, wrapped for MM-X / FedVLR (content features from ``dataset``)."""
    model = build_model(dataset.n_items, cfg.model)
    return content_model(dataset, model, cfg) if cfg.wrapper in CONTENT_WRAPPERS else model


def build_client_terms(cfg: RunConfig) -> tuple[LossTerm, ...]:
    """The client halves of ``cfg``'s plug-ins alone (what a node needs, without any server work)."""
    if cfg.plugin == "gfmfr":
        return (group_fusion.client_half(cfg),)
    return ()


def build_run_model(dataset: Dataset, cfg: RunConfig) -> tuple[FederatedRecommender, tuple[Plugin, ...]]:
    """The base model of ``cfg`` (wrapped for MM-X / FedVLR) and the plug-ins on the federation (GFMFR)."""
    model = build_client_model(dataset, cfg)
    if cfg.plugin == "gfmfr":
        return model, (group_fusion.build(dataset, model, cfg),)
    return model, ()
