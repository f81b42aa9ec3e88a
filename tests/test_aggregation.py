import numpy as np
import torch

from gfmfr.federation.aggregation import FedAvg, group_sums
from gfmfr.federation.messages import LocalUpdate


def test_sparse_rows_aggregate_like_dense_fedavg():
    g = torch.arange(8, dtype=torch.float32).view(4, 2)  # global table, 4 items
    # client 0 trained items 1 and 3, client 1 trained item 1; weight decay factors 0.5 and 0.25
    update = LocalUpdate(
        users=np.array([7, 9]),
        shared={"w": torch.tensor([[1.0], [3.0]])},
        rows={"t": torch.tensor([[10.0, 10.0], [30.0, 30.0], [20.0, 20.0]])},
        row_client=np.array([0, 0, 1]),
        row_item=np.array([1, 3, 1]),
        decay={"t": torch.tensor([0.5, 0.25])},
        num_samples=np.array([1, 3]),
    )
    dense0 = g * 0.5
    dense0[1], dense0[3] = 10.0, 30.0
    dense1 = g * 0.25
    dense1[1] = 20.0
    agg = FedAvg()
    agg.add(update, {"t": g, "w": torch.zeros(1)})
    out = agg.result({"t": g, "w": torch.zeros(1)})
    torch.testing.assert_close(out["t"], (dense0 + dense1) / 2)
    torch.testing.assert_close(out["w"], torch.tensor([2.0]))
    weighted = FedAvg(weighted=True)
    weighted.add(update, {"t": g, "w": torch.zeros(1)})
    torch.testing.assert_close(weighted.result({"t": g, "w": torch.zeros(1)})["t"], (dense0 * 1 + dense1 * 3) / 4)
    # group sums: each client in its group
    groups = group_sums(update, {"t": g}, np.array([0, 1]), 2)
    torch.testing.assert_close(groups["t"][0], dense0)
    torch.testing.assert_close(groups["t"][1], dense1)
    # the one-pass group sums agree, and a client without a group (-1) is in none
    one_pass = group_sums(update, {"t": g}, np.array([1, 0]), 3)
    torch.testing.assert_close(one_pass["t"], torch.stack([dense1, dense0, torch.zeros_like(g)]))
    torch.testing.assert_close(one_pass["w"], torch.tensor([[3.0], [1.0], [0.0]]))
    alone = group_sums(update, {"t": g}, np.array([-1, 0]), 2)
    torch.testing.assert_close(alone["t"], torch.stack([dense1, torch.zeros_like(g)]))
