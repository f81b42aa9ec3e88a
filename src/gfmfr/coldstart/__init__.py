"""Cold-start items: the item-vector sources (:mod:`.sources`) and their evaluation
(:class:`ColdStart`) on the ``cold-items`` split."""

from __future__ import annotations

from gfmfr.coldstart.evaluation import ColdStart, cold_rows, primary_source
from gfmfr.coldstart.sources import SOURCES, ColdSource

__all__ = ["SOURCES", "ColdSource", "ColdStart", "cold_rows", "primary_source"]
