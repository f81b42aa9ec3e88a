"""Plug-ins: a server half that ships each client a hint, and a client half that adds a loss term
(:mod:`gfmfr.federation.plugin`). GFMFR is :mod:`gfmfr.plugins.group_fusion`."""
