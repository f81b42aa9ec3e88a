"""Baselines GFMFR is compared with: content-aware federated models (MM-X, FedVLR) and the
centralised upper bound. Popularity and random scores live in :mod:`gfmfr.models.baselines`."""
