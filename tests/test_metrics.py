import math

import numpy as np
import pytest
import torch

from gfmfr.config import EvalConfig
from gfmfr.eval import Evaluator, metrics_from_ranks, pessimistic_ranks


def test_pessimistic_ties_by_hand():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    # row 0: target col 1 (0.5): one higher (0.9), two other equal -> rank 4
    # row 1: constant scores: target ranks last among the 4 candidates (col 4 masked)
    cand = torch.tensor([[True] * 5, [True, True, True, True, False]])
    ranks = pessimistic_ranks(scores, torch.tensor([1, 0]), cand)
    assert ranks.tolist() == [4, 4]


def test_metrics_by_hand():
    m = metrics_from_ranks(torch.tensor([1, 3, 11]), (10,))
    assert m["HR@10"] == pytest.approx(2 / 3)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)  # no cut-off: rank 11 counts
    assert m["Recall@10"] == m["HR@10"]


def test_full_ranking_masks_training_items_and_matches_ranx(planted):
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(0)
    table = torch.from_numpy(rng.normal(size=(planted.n_users, planted.n_items)).astype(np.float32))
    ev = Evaluator(planted, EvalConfig(ks=(5, 10)))
    ours = ev.evaluate(lambda users: table[torch.from_numpy(users)], "test")
    qrels, run = {}, {}
    for u in range(planted.n_users):
        train = set(planted.user_train(u).tolist())
        qrels[f"q{u}"] = {f"d{planted.test_items[u]}": 1}
        run[f"q{u}"] = {f"d{i}": float(table[u, i]) for i in range(planted.n_items) if i not in train}
    ref = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(run), ["hit_rate@5", "ndcg@10", "mrr@10", "recall@10"])
    assert ours["HR@5"] == pytest.approx(ref["hit_rate@5"])
    assert ours["NDCG@10"] == pytest.approx(ref["ndcg@10"], abs=1e-6)
    assert ours["MRR@10"] == pytest.approx(ref["mrr@10"], abs=1e-6)
    assert ours["Recall@10"] == pytest.approx(ref["recall@10"])


def test_oracle_and_sampled_protocol(planted):
    target = torch.from_numpy(planted.valid_items)

    def oracle(users):
        s = torch.zeros(len(users), planted.n_items)
        s[torch.arange(len(users)), target[torch.from_numpy(users)]] = 1
        return s

    for protocol in ("full", "sampled"):
        ev = Evaluator(planted, EvalConfig(protocol=protocol, sampled_negatives=20))
        assert ev.evaluate(oracle, "valid")["HR@10"] == 1.0
        # a constant model ranks every target last (pessimistic ties)
        assert ev.evaluate(lambda u: torch.zeros(len(u), planted.n_items), "valid")["HR@10"] == 0.0


def test_nan_scores_rank_last():
    scores = torch.tensor([[float("nan"), 0.1, 0.2], [float("nan")] * 3])
    assert pessimistic_ranks(scores, torch.tensor([0, 1])).tolist() == [3, 3]


def test_ranks_equal_counting_higher_and_tied_candidates():
    """The rank is 1 + the candidates scored above the target + the other candidates tied with it, on
    the scores through ``nan_to_num(nan=-inf)`` (NaN last, infinities as the largest finite values),
    on random scores with ties, infinities, the largest finite values, NaN and masked candidates."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    big = float(torch.finfo(torch.float32).max)
    values = st.sampled_from([0.0, 0.5, 1.0, -1.0, float("-inf"), float("inf"), float("nan"), big, -big])

    @settings(max_examples=200, deadline=None)
    @given(st.integers(1, 4), st.integers(1, 6), st.data())
    def check(rows, cols, data):
        scores = torch.tensor(
            data.draw(st.lists(st.lists(values, min_size=cols, max_size=cols), min_size=rows, max_size=rows))
        )
        target = torch.tensor(data.draw(st.lists(st.integers(0, cols - 1), min_size=rows, max_size=rows)))
        mask = data.draw(st.lists(st.lists(st.booleans(), min_size=cols, max_size=cols), min_size=rows, max_size=rows))
        candidates = torch.tensor(mask)
        candidates[torch.arange(rows), target] = True
        for given_candidates in (None, candidates):
            clean = torch.nan_to_num(scores, nan=float("-inf"))
            t = clean.gather(1, target[:, None])
            keep = torch.ones_like(clean, dtype=torch.bool) if given_candidates is None else given_candidates
            expected = 1 + ((clean > t) & keep).sum(1) + ((clean == t) & keep).sum(1) - 1
            assert torch.equal(pessimistic_ranks(scores, target, given_candidates), expected)

    check()


def test_validation_ranks_a_seeded_sample_of_users_and_test_ranks_all(planted):
    """``eval.valid_users`` below the users: validation ranks the same seeded sample every time and on
    every node (their sums add up to it), of about that size; test ranks every user."""
    from gfmfr.eval.evaluator import metrics_from_sums

    rng = np.random.default_rng(1)
    table = torch.from_numpy(rng.normal(size=(planted.n_users, planted.n_items)).astype(np.float32))
    score = lambda users: table[torch.from_numpy(users)]  # noqa: E731
    sampled = Evaluator(planted, EvalConfig(valid_users=40), seed=3)
    every = Evaluator(planted, EvalConfig(valid_users=None), seed=3)
    users = sampled.evaluated_users("valid")
    assert 20 <= len(users) <= 60 and len(users) < len(every.evaluated_users("valid"))
    np.testing.assert_array_equal(
        users, Evaluator(planted, EvalConfig(valid_users=40), seed=3).evaluated_users("valid")
    )
    assert not np.array_equal(users, Evaluator(planted, EvalConfig(valid_users=40), seed=4).evaluated_users("valid"))
    ranks = sampled.ranks(score, "valid")
    torch.testing.assert_close(ranks, every.ranks(score, "valid", users))
    assert sampled.evaluate(score, "test") == every.evaluate(score, "test")
    halves = np.array_split(np.arange(planted.n_users), 2)
    nodes = metrics_from_sums([sampled.sums(score, "valid", half) for half in halves])
    whole = sampled.evaluate(score, "valid")
    assert nodes.keys() == whole.keys() and all(nodes[k] == pytest.approx(whole[k]) for k in whole)
    assert Evaluator(planted, EvalConfig(valid_users=1000)).validating is None  # more than the users: all
    with pytest.raises(ValueError, match="eval.valid_users"):
        Evaluator(planted, EvalConfig(valid_users=0))


def test_tail_slice_covers_exactly_the_users_whose_held_out_item_is_rare(planted):
    import numpy as np

    from gfmfr.config import EvalConfig
    from gfmfr.eval.evaluator import Evaluator
    from gfmfr.eval.metrics import metrics_from_ranks

    ev = Evaluator(planted, EvalConfig(tail_max_count=16, ks=(10,)))
    counts = np.bincount(planted.train_items, minlength=planted.n_items)
    tail = counts[planted.test_items] <= 16
    assert tail.any() and not tail.all()
    rng = np.random.default_rng(0)
    table = torch.from_numpy(rng.normal(size=(planted.n_users, planted.n_items)))
    score = lambda users: table[users]  # noqa: E731
    out = ev.evaluate(score, "test")
    ranks = ev.ranks(score, "test")
    assert out["tail users"] == tail.sum()
    assert out["tail NDCG@10"] == metrics_from_ranks(ranks[torch.from_numpy(tail)], (10,))["NDCG@10"]
    assert "tail users" not in Evaluator(planted, EvalConfig(tail_max_count=0)).evaluate(score, "test")
