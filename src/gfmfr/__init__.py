"""gfmfr: group-aware multimodal fusion for federated recommendation (GFMFR, arXiv 2509.19955)."""

from gfmfr.runtime import prefer_passive_wait

prefer_passive_wait()  # before anything imports torch: OpenMP reads its wait policy once, at load

__version__ = "0.1.0"
