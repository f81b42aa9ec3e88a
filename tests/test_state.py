import numpy as np
import torch

from gfmfr.federation.state import SparseRows


def test_sparse_rows_store_decay_and_drop_zeros():
    store = SparseRows(n_items=5, row_shape=(2,))
    clients = np.array([7, 3])
    # position 0 (client 7) trains items 1, 4; position 1 (client 3) trains item 0 (to zero)
    store.update(
        clients,
        np.array([0 * 5 + 1, 0 * 5 + 4, 1 * 5 + 0]),
        torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]),
        torch.ones(2),
    )
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
    for _r in range(60):
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
    from gfmfr.config import ModelConfig
    from gfmfr.federation.state import FederationState, client_init
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


def test_file_store_round_trips_and_starts_clients_as_the_federation_does(tmp_path):
    """A client's state survives a save and a load from disk exactly; a client with no file starts
    from the same state as in the in-process store; a write never leaves a partial file behind."""
    from gfmfr.config import ModelConfig
    from gfmfr.federation.messages import ClientState
    from gfmfr.federation.state import FederationState, FileStore
    from gfmfr.models import build_model

    model = build_model(30, ModelConfig(name="fedrap", dim=8, hidden=(4,), private_item_lr=0.05))
    memory = FederationState(model, 12, seed=2)
    memory.add_scalars({"gfmfr_ratio": float("nan")})
    template = FederationState(model, 0, seed=2)
    template.add_scalars({"gfmfr_ratio": float("nan")})
    store = FileStore(tmp_path / "node-0", template.initial_state)
    fresh, expected = store.load(7), memory.load(7)
    for n, t in expected.params.items():
        assert torch.equal(fresh.params[n], t)
    assert fresh.rows["D"][0].size == 0 and np.isnan(fresh.scalars["gfmfr_ratio"])

    state = ClientState(
        {n: t + 1 for n, t in expected.params.items()},
        {"D": (np.array([3, 17]), torch.arange(16.0).view(2, 8))},
        {"gfmfr_ratio": 0.25},
    )
    store.save(7, state)
    again = FileStore(tmp_path / "node-0", template.initial_state).load(7)  # a restarted node
    for n, t in state.params.items():
        assert torch.equal(again.params[n], t)
    assert again.rows["D"][0].tolist() == [3, 17] and torch.equal(again.rows["D"][1], state.rows["D"][1])
    assert again.scalars == {"gfmfr_ratio": 0.25}
    assert sorted(p.name for p in (tmp_path / "node-0").iterdir()) == ["client-7.safetensors"]

    memory.save(7, state)  # the in-process store keeps the same state
    back = memory.load(7)
    assert back.rows["D"][0].tolist() == [3, 17] and torch.equal(back.rows["D"][1], state.rows["D"][1])
    assert back.scalars == {"gfmfr_ratio": 0.25}


def test_clients_kept_on_disk_train_as_the_in_process_federation(planted, tmp_path):
    """Three rounds of FedRAP where every client's state lives in a file (a node that could be
    restarted between rounds) give the in-process batched federation's parameters."""
    from dataclasses import replace

    from tests.test_model_contract import small_config

    from gfmfr.federation.aggregation import FedAvg
    from gfmfr.federation.client_step import client_step
    from gfmfr.federation.engine import Federation, sample_clients
    from gfmfr.federation.messages import LocalUpdate, TrainInstruction
    from gfmfr.federation.state import FederationState, FileStore
    from gfmfr.models import build_model

    cfg = small_config("fedrap")
    cfg = replace(cfg, federation=replace(cfg.federation, client_fraction=0.5))
    model = build_model(planted.n_items, cfg.model)
    fed = Federation(planted, model, cfg)
    shared = dict(fed.state.shared)
    for t in range(3):
        fed.train_round(t)
        store = FileStore(tmp_path, FederationState(model, 0, cfg.seed).initial_state)  # a fresh process each round
        uploads = []
        for u in sample_clients(planted.n_users, 0.5, cfg.seed, t):
            new, upload = client_step(
                model,
                cfg.federation,
                cfg.seed,
                int(u),
                planted.user_train(int(u)),
                store.load(int(u)),
                TrainInstruction(t, shared),
            )
            store.save(int(u), new)
            uploads.append(upload)
        agg = FedAvg()
        agg.add(LocalUpdate.stack(uploads), shared)
        shared = agg.result(shared)
    for n, value in fed.state.shared.items():
        torch.testing.assert_close(shared[n], value, rtol=1e-5, atol=1e-5)
    store = FileStore(tmp_path, FederationState(model, 0, cfg.seed).initial_state)
    for u in range(planted.n_users):
        disk, memory = store.load(u), fed.state.load(u)
        for n, value in memory.params.items():
            torch.testing.assert_close(disk.params[n], value, rtol=1e-5, atol=1e-5)
        assert disk.rows["D"][0].tolist() == memory.rows["D"][0].tolist()
        torch.testing.assert_close(disk.rows["D"][1], memory.rows["D"][1], rtol=1e-5, atol=1e-5)
