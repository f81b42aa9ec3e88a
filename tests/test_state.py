import numpy as np
import torch

from gfmfr.federation.state import SparseRows


def test_sparse_rows_store_decay_and_drop_zeros():
    store = SparseRows(n_items=5, row_shape=(2,))
    clients = np.array([7, 3])
    # position 0 (client 7) trains items 1, 4; position 1 (client 3) trains item 0 (to zero)
    store.update(clients, np.array([0 * 5 + 1, 0 * 5 + 4, 1 * 5 + 0]),
                 torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]), torch.ones(2))
    assert store.items[7].tolist() == [1, 4] and 3 not in store.items  # an all-zero row is not kept
    # next round client 7 trains item 4 only: item 1 just decays
    store.update(np.array([7]), np.array([4]), torch.tensor([[5.0, 5.0]]), torch.tensor([0.5]))
    dense = store.dense(np.array([3, 7]))
    torch.testing.assert_close(dense[1, 1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(dense[1, 4], torch.tensor([5.0, 5.0]))
    assert dense[0].abs().sum() == 0 and dense[1, [0, 2, 3]].abs().sum() == 0
    got = store.gather(np.array([3, 7]), np.array([0 * 5 + 1, 1 * 5 + 1, 1 * 5 + 2]))
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.0, 0.0]]))
    assert store.nbytes > 0
