"""Every algorithm of the project on Flower 1.41 (Message API), simulated or deployed.

Flower's layout, by role:

- :mod:`.client_app`: the ClientApp a SuperNode runs. A node hosts a partition of the users
  (one user on a phone, thousands on a server) and trains the users the server sampled among its
  own with the batched form of the one-client step (:mod:`gfmfr.federation.batched`).
- :mod:`.server_app`: the ServerApp and its :class:`~.strategy.FedRecStrategy`: seeded sampling of
  users, the plug-ins' server half and hints, the project's FedAvg, evaluation as sums over nodes,
  best-round selection on validation.
- :mod:`.node`, :mod:`.wire`: the task code both share: a node's data, model and state (persisted
  in its state directory, atomically), and the messages' encoding.
- :mod:`.simulation`: ``gfmfr run --backend flower --nodes N`` through Flower's simulation engine.

Importing this package (as importing any of its modules does first) sets Flower's and Ray's
telemetry and update checks off and forbids ``flwr run`` from installing dependencies at run time
(it would install a CUDA torch).
"""

from __future__ import annotations

import os

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""Set (unless already set) before Flower is imported, in this process and the ones it starts."""

for _key, _value in FLOWER_ENV.items():
    os.environ.setdefault(_key, _value)
