"""Readers for the supported on-disk layouts; every reader returns :class:`RawData`.

Layouts:
- built-in ``ml-100k``: the RecBole 1.2.1 wheel's atomic files (see :mod:`gfmfr.data.ml100k`);
- generic folder: ``interactions.csv`` (``user_id,item_id[,rating][,timestamp]``) and an optional
  ``items.csv`` (``item_id,text,image,...``) whose ``image`` paths are relative to the folder;
- the official GFMFR/FedVLR layout: ``inter.csv`` (``userID,itemID,rating,timestamp[,split_label]``)
  plus ``text_features.npy`` / ``image_features.npy`` with one row per ``itemID`` (0 .. n-1), and
  optionally ``items.csv`` (``itemID,text,...``) with the raw text beside the precomputed features;
- RecBole atomic files: ``NAME.inter`` (and optionally ``NAME.item``), tab-separated, typed headers.

Column names are matched whatever their case and underscores (``userID``, ``userId`` and ``user_id`` are
one column). A ``split_label`` column (0 train, 1 validation, 2 test) is a split given by the source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gfmfr.data.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class RawItems:
    """Item side information keyed by the source's item id (a string)."""

    item_ids: list[str]
    """Source item ids, in file order."""
    text: list[str | None] | None = None
    """One description per item (``None`` where missing), or no text at all."""
    image: list[Path | None] | None = None
    """One image path per item (``None`` where the source names none)."""
    features: dict[str, np.ndarray] = field(default_factory=dict)
    """Precomputed feature matrices per modality (``text``, ``image``), rows aligned with ``item_ids``."""
    source: str = ""
    """File the items came from, for messages."""


@dataclass
class RawData:
    """Interactions as read, before any preprocessing."""

    interactions: pd.DataFrame
    """Columns ``user_id``, ``item_id`` (str), ``rating``, ``timestamp`` (float, NaN if absent), ``line``, and
    ``split_label`` (0 train, 1 validation, 2 test) where the source gives its own split."""
    source: str
    """File the interactions came from, for messages."""
    items: RawItems | None = None
    """Item side information, if the source has any."""


SPLIT_LABELS = {0: "train", 1: "valid", 2: "test"}
"""The values of a ``split_label`` column (the FedVLR/GFMFR layout's)."""


def _key(name: str) -> str:
    """A column name as matched: lower case, without underscores, spaces or dashes."""
    return "".join(c for c in str(name).lower() if c not in "_ -")


def canonical_columns(frame: pd.DataFrame, names: list[str], path: Path) -> pd.DataFrame:
    """``frame`` with each column that matches one of ``names`` (:func:`_key`) renamed to it; two columns
    matching one name is an error naming the header."""
    wanted = {_key(n): n for n in names}
    rename: dict[str, str] = {}
    for column in frame.columns:
        ours = wanted.get(_key(column))
        if ours is None:
            continue
        if ours in rename.values():
            first = next(c for c, o in rename.items() if o == ours)
            raise DataError(path, f"columns {first!r} and {column!r} both read as {ours!r}", line=1, field=column)
        rename[column] = ours
    return frame.rename(columns=rename)


def _require_columns(frame: pd.DataFrame, required: list[str], path: Path) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            path, f"missing column(s) {missing}; the header has {list(frame.columns)}", line=1, field=missing[0]
        )


def _numeric(frame: pd.DataFrame, column: str, path: Path, first_line: int) -> np.ndarray:
    """Parse one column as float; a non-empty value that does not parse is an error naming its line."""
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(path, f"value {raw.iloc[pos]!r} is not a number", line=first_line + pos, field=column)
    empty = values.isna()
    if column == "rating" and empty.any():
        pos = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataError(path, "empty rating", line=first_line + pos, field=column)
    return values.to_numpy(dtype=np.float64)


def _interaction_frame(frame: pd.DataFrame, path: Path, first_line: int = 2) -> pd.DataFrame:
    """Normalise a raw table to the RawData.interactions schema (columns matched by :func:`_key`)."""
    frame = canonical_columns(frame, ["user_id", "item_id", "rating", "timestamp", "split_label"], path)
    _require_columns(frame, ["user_id", "item_id"], path)
    out = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype(str).str.strip(),
            "item_id": frame["item_id"].astype(str).str.strip(),
        }
    )
    for name in ("user_id", "item_id"):
        empty = (out[name] == "") | (out[name] == "nan")
        if empty.any():
            pos = int(np.flatnonzero(empty.to_numpy())[0])
            raise DataError(path, "empty id", line=first_line + pos, field=name)
    for name in ("rating", "timestamp"):
        if name in frame.columns:
            out[name] = _numeric(frame, name, path, first_line)
        else:
            out[name] = 1.0 if name == "rating" else np.nan
    if "split_label" in frame.columns:
        labels = _numeric(frame, "split_label", path, first_line)
        bad = ~np.isin(labels, list(SPLIT_LABELS))
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise DataError(
                path,
                f"split label {frame['split_label'].iloc[pos]!r} is not one of 0 (train), 1 (validation), 2 (test)",
                line=first_line + pos,
                field="split_label",
            )
        out["split_label"] = labels.astype(np.int64)
    out["line"] = np.arange(first_line, first_line + len(out), dtype=np.int64)
    return out


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """Read a CSV as strings, naming the file on any parse problem."""
    if not path.exists():
        raise DataError(path, "file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(path, f"cannot parse: {exc}") from exc


def read_items_csv(path: Path, base: Path | None = None) -> RawItems:
    """``items.csv`` with ``item_id`` and optional ``text`` / ``image`` (relative to ``base``)."""
    frame = canonical_columns(read_csv(path), ["item_id", "text", "image"], path)
    _require_columns(frame, ["item_id"], path)
    ids = frame["item_id"].astype(str).str.strip()
    dup = ids.duplicated()
    if dup.any():
        pos = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(path, f"duplicate item_id {ids.iloc[pos]!r}", line=2 + pos, field="item_id")
    base = base if base is not None else path.parent
    text = None
    if "text" in frame.columns:
        text = [t if t.strip() else None for t in frame["text"].astype(str)]
    image = None
    if "image" in frame.columns:
        image = [base / p.strip() if p.strip() else None for p in frame["image"].astype(str)]
    return RawItems(item_ids=list(ids), text=text, image=image, source=str(path))


def read_generic_folder(folder: Path) -> RawData:
    """``interactions.csv`` plus an optional ``items.csv``."""
    path = folder / "interactions.csv"
    frame = read_csv(path)
    inter = _interaction_frame(frame, path)
    items = read_items_csv(folder / "items.csv", folder) if (folder / "items.csv").exists() else None
    return RawData(interactions=inter, source=str(path), items=items)


def load_feature_matrix(path: Path, n_rows: int) -> np.ndarray:
    """A ``.npy`` matrix of real numbers (any float or integer dtype, any width) with exactly ``n_rows``
    finite rows, as float32."""
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read as .npy: {exc}") from exc
    if matrix.ndim != 2:
        raise DataError(path, f"expected a 2-D matrix, got shape {matrix.shape}")
    if matrix.dtype.kind not in "fiu":
        raise DataError(path, f"expected real numbers, got dtype {matrix.dtype}")
    if matrix.shape[0] != n_rows:
        raise DataError(path, f"has {matrix.shape[0]} rows, expected {n_rows} (one per item)")
    matrix = matrix.astype(np.float32)
    bad = ~np.isfinite(matrix)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise DataError(
            path, f"non-finite value {matrix[row, col]} (row {row}, column {col})", line=row, field=str(col)
        )
    return matrix


def read_fedvlr_folder(folder: Path) -> RawData:
    """The official GFMFR/FedVLR layout: ``inter.csv`` plus per-item ``*_features.npy`` and, optionally,
    ``items.csv`` with the items' raw text. Item ids are row indices into the feature files: the catalogue
    is ``items.csv``'s rows where there is one, else ids 0 .. max(itemID)."""
    path = folder / "inter.csv"
    inter = _interaction_frame(read_csv(path), path)
    files = {m: folder / f"{m}_features.npy" for m in ("text", "image")}
    files = {m: f for m, f in files.items() if f.exists()}
    raw_items = read_items_csv(folder / "items.csv", folder) if (folder / "items.csv").exists() else None
    if not files:
        return RawData(interactions=inter, source=str(path), items=raw_items)
    ids = pd.to_numeric(inter["item_id"], errors="coerce")
    bad = ids.isna() | (ids < 0) | (ids != ids.round())
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            path,
            f"itemID {inter['item_id'].iloc[pos]!r} is not a row index into the feature files",
            line=2 + pos,
            field="item_id",
        )
    if raw_items is not None:
        expected = [str(i) for i in range(len(raw_items.item_ids))]
        if raw_items.item_ids != expected:
            pos = next(k for k, (a, b) in enumerate(zip(raw_items.item_ids, expected)) if a != b)
            raise DataError(
                raw_items.source,
                f"item ids must be the feature rows 0, 1, ... in order; got {raw_items.item_ids[pos]!r} at row {pos}",
                line=2 + pos,
                field="item_id",
            )
        n_rows = len(expected)
    else:
        n_rows = int(ids.max()) + 1
    beyond = ids >= n_rows
    if beyond.any():
        pos = int(np.flatnonzero(beyond.to_numpy())[0])
        raise DataError(
            path,
            f"itemID {inter['item_id'].iloc[pos]!r} has no row in items.csv ({n_rows} items)",
            line=2 + pos,
            field="item_id",
        )
    matrices = {m: load_feature_matrix(f, n_rows) for m, f in files.items()}
    items = RawItems(item_ids=[str(i) for i in range(n_rows)], features=matrices, source=str(folder))
    if raw_items is not None:
        items.text, items.image = raw_items.text, raw_items.image
    return RawData(interactions=inter, source=str(path), items=items)


def read_atomic_table(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header fields ``name:type``."""
    frame = read_csv(path, sep="\t", quoting=3, encoding_errors="replace")
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def read_atomic_folder(folder: Path, name: str | None = None) -> RawData:
    """RecBole atomic files ``NAME.inter`` and optionally ``NAME.item`` (title/year/class become text)."""
    inters = sorted(folder.glob("*.inter")) if name is None else [folder / f"{name}.inter"]
    if not inters:
        raise DataError(folder, "no .inter file found")
    path = inters[0]
    inter = _interaction_frame(read_atomic_table(path), path)
    items = None
    item_path = path.with_suffix(".item")
    if item_path.exists():
        table = read_atomic_table(item_path)
        _require_columns(table, ["item_id"], item_path)
        items = RawItems(item_ids=list(table["item_id"].astype(str)), text=_describe(table), source=str(item_path))
    return RawData(interactions=inter, source=str(path), items=items)


def _describe(table: pd.DataFrame) -> list[str | None] | None:
    """A short text per item from RecBole metadata columns (title, year, genres), if present."""
    title = next((c for c in ("movie_title", "title", "name") if c in table.columns), None)
    if title is None:
        return None
    texts = []
    year = table["release_year"] if "release_year" in table.columns else None
    genres = table["class"] if "class" in table.columns else None
    for i, t in enumerate(table[title].astype(str)):
        parts = t
        if year is not None and str(year.iloc[i]).strip():
            parts += f" ({year.iloc[i]})"
        if genres is not None and str(genres.iloc[i]).strip():
            parts += f". Genres: {genres.iloc[i]}"
        texts.append(parts)
    return texts


def read_folder(folder: str | Path) -> RawData:
    """Detect the layout of ``folder`` and read it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder (and not a built-in dataset name)")
    if (folder / "interactions.csv").exists():
        return read_generic_folder(folder)
    if (folder / "inter.csv").exists():
        return read_fedvlr_folder(folder)
    if any(folder.glob("*.inter")):
        return read_atomic_folder(folder)
    raise DataError(folder, "no interactions.csv, inter.csv or *.inter file in this folder")
