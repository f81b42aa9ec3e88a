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


def test_sparse_rows_lazy_decay_matches_eager_over_many_rounds():
    """The per-client lazy scale gives the eagerly decayed values, also past the underflow guard."""
    rng = np.random.default_rng(0)
    store = SparseRows(n_items=6, row_shape=(3,), capacity=2)
    eager = torch.zeros(4, 6, 3)
    for r in range(60):
        clients = np.sort(rng.choice(4, size=2, replace=False))
        decay = torch.tensor([0.4, 0.3])
        trained = [np.sort(rng.choice(6, size=2, replace=False)) for _ in clients]
        keys = np.concatenate([i * 6 + t for i, t in enumerate(trained)])
        values = torch.from_numpy(rng.normal(size=(len(keys), 3)).astype(np.float32))
        for i, c in enumerate(clients):
            eager[c] *= decay[i]
            eager[c, trained[i]] = values[2 * i : 2 * i + 2]
        store.update(clients, keys, values, decay)
        torch.testing.assert_close(store.dense(np.arange(4)), eager, rtol=1e-5, atol=1e-30)
    got = store.gather(np.array([2, 0]), np.array([0 * 6 + 5, 1 * 6 + 0, 1 * 6 + 3]))
    torch.testing.assert_close(got, torch.stack([eager[2, 5], eager[0, 0], eager[0, 3]]), rtol=1e-5, atol=1e-30)


def test_client_init_depends_only_on_seed_client_and_name():
    """A client's initial private values do not depend on the federation's size or who else is in it."""
    from gfmfr.federation.state import FederationState, client_init
    from gfmfr.config import ModelConfig
    from gfmfr.models import build_model
    from gfmfr.models.base import ParamSpec

    spec = ParamSpec((8,), shared=False, lr=0.1, weight_decay=0.0, same_init=False)
    alone = client_init(spec, "user", np.array([41]), 0.1, seed=3)
    among = client_init(spec, "user", np.arange(100), 0.1, seed=3)
    torch.testing.assert_close(alone[0], among[41], rtol=0, atol=0)
    assert not torch.equal(among[41], client_init(spec, "user", np.array([41]), 0.1, seed=4)[0])
    assert not torch.equal(among[41], client_init(spec, "other", np.array([41]), 0.1, seed=3)[0])
    big = client_init(spec, "user", np.arange(20_000), 1.0, seed=0).flatten()
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01  # standard normal draws

    model = build_model(30, ModelConfig(name="fcf", dim=8))
    small, large = FederationState(model, 5, seed=1), FederationState(model, 50, seed=1)
    torch.testing.assert_close(small.private["user"], large.private["user"][:5], rtol=0, atol=0)
    torch.testing.assert_close(small.shared["item"], large.shared["item"], rtol=0, atol=0)
