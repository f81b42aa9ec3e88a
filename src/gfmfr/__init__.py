"""gfmfr: group-aware multimodal fusion for federated recommendation (GFMFR, arXiv 2509.19955)."""

__version__ = "0.1.0"
