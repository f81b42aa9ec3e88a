"""Secure aggregation (``privacy.secure_aggregation``): Flower's SecAgg+ sums the nodes' updates.

The runs go through the real ServerApp, ClientApp and Flower's SecAgg+ workflow and mod on a
:class:`gfmfr.flower.local.LocalGrid` (Flower messages, no Ray): the same numbers as the plain run
within the quantisation's error, for every model with and without GFMFR, on few nodes and on one user
per node; a node that drops out mid-round does not stop the round; too many do, with an error; and no
reply the server receives carries a node's update in the clear.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.common import bytes_to_ndarray  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage  # noqa: E402
from tests.test_flower import MODELS, assert_same_rounds, deploy, make_folder, run_local, small  # noqa: E402

from gfmfr.config import ConfigError, from_dict, to_dict  # noqa: E402
from gfmfr.flower import secure  # noqa: E402
from gfmfr.flower.local import LocalGrid  # noqa: E402
from gfmfr.run import run  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("secure-data"))


def secured(cfg, **privacy):
    return from_dict({**to_dict(cfg), "privacy": {"secure_aggregation": True, **privacy}})


def stage(message) -> str | None:
    record = message.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if record is None else record.get("stage")


@pytest.mark.parametrize("plugin", ["none", "gfmfr"])
@pytest.mark.parametrize("model", MODELS)
def test_secure_aggregation_gives_the_plain_numbers(folder, tmp_path, model, plugin):
    """3 nodes: per-round validation metrics and the best round's test metrics equal to the in-process
    run's within 1e-4, as is the mean local loss (losses and figures travel divided by secure.SCALE)."""
    cfg = small(folder, model, plugin)
    assert_same_rounds(run_local(secured(cfg), 3, tmp_path), run(cfg), tol=1e-4)


@pytest.mark.parametrize("mode, plugin", [("central", "gfmfr"), ("local", "none")])
def test_secure_aggregation_under_differential_privacy(folder, tmp_path, mode, plugin):
    """DP and SecAgg+ together on 3 nodes: the nodes clip (and in local mode noise), SecAgg+ sums, the
    server noises the sum (and GFMFR's group sums) as in-process; the same numbers and epsilons."""
    dp = {"mode": mode, "noise_multiplier": 0.3, "clip": 2.0, "signature_noise": 0.5 if plugin == "gfmfr" else 0.0}
    cfg = from_dict({**to_dict(small(folder, "fcf", plugin, rounds=4)), "privacy": dp})
    flower = run_local(secured(cfg, **dp), 3, tmp_path)
    inprocess = run(cfg)
    assert_same_rounds(flower, inprocess, tol=1e-4)
    assert [h["epsilon"] for h in flower["history"]] == [h["epsilon"] for h in inprocess["history"]]


def test_one_user_per_node_under_secure_aggregation(folder, tmp_path):
    """40 nodes of one user each, each sharing its secrets with 9 of them (SecAgg+'s sparse
    neighbourhoods): GFMFR-FCF with the in-process numbers (the mean loss within the stated
    quantisation bound, which losses reach SCALE times)."""
    cfg = small(folder, "fcf", "gfmfr", rounds=2)
    flower = run_local(secured(cfg, secagg_neighbours=8), 40, tmp_path)
    assert flower["flower"]["partitions"] == 40
    assert_same_rounds(flower, run(cfg), tol=1e-4, loss_tol=secure.error_bound(40) * secure.SCALE)


class Dropping(LocalGrid):
    """A LocalGrid whose partitions in ``lost`` lose their reply to SecAgg+'s masked-vector step in
    round ``round_`` (they trained, then died before their masked vector reached the server)."""

    lost: set[int] = set()
    round_ = "2"
    seen: list = []

    def send_and_receive(self, messages, *, timeout=None):
        sent = list(messages)
        replies = super().send_and_receive(sent, timeout=timeout)
        out = []
        for m, r in zip(sent, replies):
            self.seen.append(r)
            partition = int(self.contexts[m.metadata.dst_node_id].node_config["partition-id"])
            if (
                stage(m) == Stage.COLLECT_MASKED_VECTORS
                and m.metadata.group_id == self.round_
                and partition in self.lost
            ):
                continue
            out.append(r)
        return out


def run_dropping(cfg, nodes, tmp_path, lost):
    Dropping.lost, Dropping.seen = set(lost), []
    return run_local(cfg, nodes, tmp_path, grid_hook=lambda g: as_dropping(g))


def as_dropping(grid: LocalGrid) -> LocalGrid:
    grid.__class__ = Dropping
    return grid


def test_a_node_that_drops_out_mid_round_does_not_stop_the_round(folder, tmp_path, caplog):
    """4 nodes, threshold 1/2: one node's masked vector is lost in round 1; its masks are recovered from
    its neighbours' shares, the round ends with the other nodes' sum, and the run goes on."""
    cfg = secured(small(folder, "fcf", rounds=3))
    with caplog.at_level(logging.WARNING):
        flower = run_dropping(cfg, 4, tmp_path, lost={1})
    assert [h["round"] for h in flower["history"]] == [0, 1, 2]
    assert "1 node(s) dropped out of secure aggregation" in caplog.text
    plain = run(small(folder, "fcf", rounds=3))
    assert flower["history"][0]["valid"]["NDCG@10"] == pytest.approx(plain["history"][0]["valid"]["NDCG@10"], abs=1e-6)
    # round 1 averaged three nodes' clients, not four: the model is not the plain run's
    assert (
        flower["history"][1]["loss"] != pytest.approx(plain["history"][1]["loss"], abs=1e-4)
        or flower["history"][1]["valid"] != plain["history"][1]["valid"]
    )
    assert all(np.isfinite(h["loss"]) for h in flower["history"])


def test_more_dropouts_than_the_threshold_allows_end_the_run_with_an_error(folder, tmp_path):
    cfg = secured(small(folder, "fcf", rounds=3), secagg_threshold=1.0)
    with pytest.raises(RuntimeError, match="secure aggregation halted in round 1"):
        run_dropping(cfg, 4, tmp_path, lost={1, 2})


@pytest.mark.parametrize("plugin", ["none", "gfmfr"])
def test_no_reply_carries_a_nodes_update_in_the_clear(folder, tmp_path, plugin):
    """Every training reply the server receives is SecAgg+'s (keys, encrypted shares, masked integers)
    with no tensor, except GFMFR's signatures in its server rounds; the masked vectors look nothing like
    the vectors behind them."""
    cfg = secured(small(folder, "fcf", plugin, rounds=2))
    run_dropping(cfg, 3, tmp_path, lost=set())
    kinds, masked_seen = set(), 0
    for reply in Dropping.seen:
        if reply.metadata.message_type != "train":
            continue
        records = {k for k, r in reply.content.array_records.items() if len(r)}
        kinds.add(frozenset(records))
        if RECORD_KEY_CONFIGS in reply.content.config_records:
            masked = reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
            if masked is not None:
                masked_seen += 1
                values = np.concatenate([bytes_to_ndarray(b).ravel() for b in masked]).astype(np.float64)
                assert values.std() > 2**28  # uniform masks mod 2^32, not a vector of small integers
    assert masked_seen == 2 * 3  # every node, every round
    assert kinds <= {frozenset(), frozenset({"signatures"})}
    assert (frozenset({"signatures"}) in kinds) == (plugin == "gfmfr")


def test_the_quantisation_fits_the_modulus_and_its_error_is_stated():
    for nodes in (2, 3, 10, 100, 1000, 5000):
        q = secure.quantisation(nodes)
        assert nodes * q < secure.MODULUS  # the sum of every node's integers never wraps
        assert secure.error_bound(nodes) == pytest.approx(nodes * 2 * secure.CLIP / q)
    assert secure.error_bound(3) < 1e-7


def test_node_vectors_decode_to_fedavgs_sums():
    """Without masks or quantisation: two nodes' vectors, weighted by their clients as Flower weights
    them, decode to the sums FedAvg takes from the nodes' plain partial aggregates."""
    from gfmfr.federation.aggregation import FedAvg
    from gfmfr.federation.messages import LocalUpdate

    gen = torch.Generator().manual_seed(0)
    shared = {"item": torch.randn(6, 3, generator=gen), "b": torch.randn((), generator=gen)}
    layout = secure.Layout(("b", "item"), (), ("item",))

    def update(users, items):
        rows = torch.randn(sum(len(i) for i in items), 3, generator=gen)
        return LocalUpdate(
            users=np.array(users),
            shared={"b": torch.randn(len(users), generator=gen)},
            rows={"item": rows},
            row_client=np.repeat(np.arange(len(users)), [len(i) for i in items]),
            row_item=np.concatenate(items),
            decay={"item": torch.ones(len(users))},
            num_samples=np.ones(len(users), np.int64),
            loss=np.ones(len(users)),
        )

    a, b = update([0, 1], [np.array([0, 2]), np.array([2, 5])]), update([2], [np.array([1])])
    vectors = [secure.node_vector(a, shared, layout, 2, 0), secure.node_vector(b, shared, layout, 1, 0)]
    mean = [(2 * x + 1 * y) / 3 for x, y in zip(*vectors)]
    got = secure.decode(mean, 3, shared, layout)
    plain = FedAvg()
    plain.add(a, shared)
    plain.add(b, shared)
    for name in shared:
        torch.testing.assert_close(got.sums[name], plain.sums[name])
    assert got.total == 3 and got.clients == 3 and got.loss_sum == pytest.approx(3.0)
    assert got.touches["item"].tolist() == [1, 1, 2, 0, 0, 1]


def test_secure_aggregation_needs_flower_and_a_plain_mean(folder):
    cfg = small(folder, "fcf")
    with pytest.raises(ConfigError, match="--backend flower"):
        run(secured(cfg))
    with pytest.raises(ConfigError, match="weighted_aggregation"):
        from_dict(
            {**to_dict(cfg), "federation": {"weighted_aggregation": True}, "privacy": {"secure_aggregation": True}}
        )


def test_secure_aggregation_needs_two_nodes(folder, tmp_path):
    with pytest.raises(RuntimeError, match="at least 2 nodes"):
        run_local(secured(small(folder, "fcf")), 1, tmp_path)


@pytest.mark.slow
def test_secure_aggregation_in_deployment(folder, tmp_path):
    """A real SuperLink and 3 SuperNodes, each node's ClientApp tasks run by one ``gfmfr node-worker``
    (its SecAgg+ state goes back to the SuperNode in the node's Flower context after every task):
    PFedRec with the in-process numbers."""
    cfg = small(folder, "pfedrec", rounds=1)
    flower, _, wall = deploy(secured(cfg), tmp_path, restart=False, workers=True)
    assert_same_rounds(flower, run(cfg), tol=1e-4)
    print(f"secure deployment wall time {wall:.0f} s")
