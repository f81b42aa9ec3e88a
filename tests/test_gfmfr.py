"""GFMFR: grouping, alignment, fusion, teacher, distillation, and an end-to-end smoke run."""

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from gfmfr.config import ModelConfig, from_dict
from gfmfr.gfmfr.distill import bernoulli_kl, cosine_anneal, distill_weight, ema
from gfmfr.gfmfr.fusion import EXPERTS, GroupFusion, fit_fusion
from gfmfr.gfmfr.grouping import Grouping, align, cluster, prepare
from gfmfr.gfmfr.plugin import teacher_mean_head, teacher_members
from gfmfr.models import FEDERATED_MODELS, build_model
from gfmfr.run import run


def communities(n=90, k=3, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 3
    truth = np.arange(n) % k
    return centers[truth] + rng.normal(size=(n, dim)), truth


@pytest.mark.parametrize("method", ["spectral", "kmeans"])
def test_clustering_recovers_planted_communities(method):
    x, truth = communities()
    labels = cluster(prepare(x), 3, method, seed=0)
    assert adjusted_rand_score(truth, labels) > 0.95


def test_alignment_keeps_ids_under_relabelling():
    previous = np.array([0, 0, 1, 1, 2, 2, -1])
    relabelled = np.array([2, 2, 0, 0, 1, 1, 1])  # same partition, permuted ids
    assert align(previous, relabelled, 3).tolist() == [0, 0, 1, 1, 2, 2, 2]
    g = Grouping(8, 3, "kmeans")
    x, truth = communities(n=6, k=3)
    first = g.update(np.arange(6), x, seed=0)
    perm = np.array([3, 4, 5, 0, 1, 2])  # the same clients arrive in another order
    second = g.update(perm, x[perm], seed=1)
    np.testing.assert_array_equal(second, first[perm])
    assert g.group[6] == -1 and g.group[7] == -1  # never sampled: no group
    g.update(np.array([0, 1, 2]), x[:3], seed=2)
    np.testing.assert_array_equal(g.group[3:6], first[3:6])  # not sampled: keep their last group


def test_distillation_functions_by_hand():
    assert cosine_anneal(0, 100) == 1.0 and abs(cosine_anneal(100, 100)) < 1e-12
    assert cosine_anneal(50, 100) == pytest.approx(math.cos(math.pi / 4))
    prev = torch.tensor([float("nan"), 2.0])
    torch.testing.assert_close(ema(prev, torch.tensor([4.0, 4.0]), 0.9), torch.tensor([4.0, 2.2]))
    kl = bernoulli_kl(torch.tensor([0.8, 0.3]), torch.tensor([0.0, math.log(0.3 / 0.7)]))
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    torch.testing.assert_close(kl, torch.tensor([expected, 0.0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(distill_weight(torch.tensor([2.0]), 50, 100), torch.tensor([2.0 * math.cos(math.pi / 4)]))
    torch.testing.assert_close(distill_weight(torch.tensor([2.0]), 50, 100, "constant"), torch.tensor([2.0]))
    torch.testing.assert_close(distill_weight(torch.tensor([2.0]), 25, 100, "linear"), torch.tensor([1.5]))
    with pytest.raises(ValueError, match="gfmfr.schedule"):
        distill_weight(torch.tensor([2.0]), 1, 100, "step")


def test_distillation_mask_by_hand():
    from gfmfr.federation.client import Batch
    from gfmfr.gfmfr.plugin import distill_mask, masked_mean

    batch = Batch(np.array([0, 1]), torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1.0, 0, 0], [1, 1, 0]]),
                  torch.tensor([[1.0, 1, 1], [1, 1, 0]]))
    torch.testing.assert_close(distill_mask(batch, "negatives"), torch.tensor([[0.0, 1, 1], [0, 0, 0]]))
    kl = torch.tensor([[3.0, 1.0, 2.0], [5.0, 7.0, 9.0]])
    torch.testing.assert_close(masked_mean(kl, distill_mask(batch, "all")), torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(masked_mean(kl, distill_mask(batch, "negatives")), torch.tensor([1.5, 0.0]))
    # nominal batch size 4: the second client's two real pairs weigh 1/4 each, not 1/2
    torch.testing.assert_close(masked_mean(kl, distill_mask(batch, "all"), 4), torch.tensor([1.5, 3.0]))
    with pytest.raises(ValueError, match="distill_on"):
        distill_mask(batch, "positives")


def test_teachers_by_hand():
    model = build_model(2, ModelConfig(name="fcf", dim=2))
    signatures = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two members of group 0: their user vectors
    fused = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # Q_0 for two items
    members = teacher_members(model, signatures, torch.tensor([0, 0]), fused)
    sig = lambda v: 1 / (1 + math.exp(-v))
    torch.testing.assert_close(members, torch.tensor([[(sig(2) + sig(0)) / 2, 0.5]]))
    mean_head = teacher_mean_head(model, model.head_from_signature(signatures.mean(0, keepdim=True)), fused)
    torch.testing.assert_close(mean_head, torch.tensor([[sig(1.0), 0.5]]))


@pytest.mark.parametrize("expert", EXPERTS)
@pytest.mark.parametrize("n_modalities", [1, 3])
def test_fusion_experts_fit_and_mask(expert, n_modalities):
    gen = torch.Generator().manual_seed(0)
    n, d = 40, 8
    feats = [torch.randn(n, 5 + m, generator=gen) for m in range(n_modalities)]
    masks = [torch.ones(n, dtype=torch.bool) for _ in range(n_modalities)]
    masks[-1][:5] = False  # some items miss the last modality
    fusion = GroupFusion(2, d, feats, masks, expert)
    shared = feats[0] @ torch.randn(5, d, generator=gen)  # a content map shared by the groups, plus a group offset
    target = torch.stack([shared + torch.randn(d, generator=gen) for _ in range(2)])
    before = ((fusion(torch.arange(2)) - target) ** 2).sum(-1).mean().item()
    after = fit_fusion(fusion, torch.arange(2), target, steps=200, lr=0.05)
    assert after < 0.5 * before
    # a missing modality does not reach the output: its features can change freely
    out = fusion(torch.arange(2)).detach()
    getattr(fusion, f"x{n_modalities - 1}")[:5] += 100.0
    torch.testing.assert_close(fusion(torch.arange(2))[:, :5].detach(), out[:, :5])


@pytest.mark.parametrize("into", ["private", "shared"])
@pytest.mark.parametrize("name", sorted(FEDERATED_MODELS))
def test_distilling_into_one_side_leaves_the_other_alone(name, into):
    """``distill_into``: no gradient reaches the other side; the trained side gets the same as with ``all``."""
    from gfmfr.gfmfr.plugin import logits_training

    model = build_model(20, ModelConfig(name=name, dim=8, hidden=(4,)))
    specs = model.param_specs()
    gen = torch.Generator().manual_seed(0)
    A, B = 3, 5
    p = {n: torch.randn(A, *s.shape, generator=gen).requires_grad_()
         for n, s in specs.items() if not s.item_table}
    items = {n: torch.randn(A, B, *s.shape, generator=gen).requires_grad_()
             for n, s in specs.items() if s.item_table and s.trainable}
    leaves = {**p, **items}
    weights = torch.randn(A, B, generator=gen)
    full = torch.autograd.grad((model.forward(p, items) * weights).sum(), list(leaves.values()), allow_unused=True)
    one_side = logits_training(model, p, items, into)
    torch.testing.assert_close(one_side, model.forward(p, items))
    grads = torch.autograd.grad((one_side * weights).sum(), list(leaves.values()), allow_unused=True)
    trained = [n for n in leaves if specs[n].shared == (into == "shared")]
    assert trained and len(trained) < len(leaves)
    for n, g_full, g in zip(leaves, full, grads):
        if n not in trained:
            assert g is None
        elif g_full is not None:
            torch.testing.assert_close(g, g_full)


def test_bad_plugin_settings_fail_before_training(planted):
    from gfmfr.config import ConfigError

    for field, value in (("distill_into", "head"), ("schedule", "step"), ("kl_average", "mean"),
                         ("distill_on", "positives"), ("teacher", "best"), ("send", "some"),
                         ("score_with", "teacher")):
        with pytest.raises(ConfigError, match=f"gfmfr.{field}: must be one of"):  # on load, before any training
            gfmfr_config("fcf", **{field: value})


def test_per_group_item_view_fits_what_is_particular_to_each_group():
    """Targets differ per group item by item (no content explains it): only a per-group view can fit them."""
    gen = torch.Generator().manual_seed(0)
    n, d, G = 30, 4, 3
    feats, masks = [torch.randn(n, 6, generator=gen)], [torch.ones(n, dtype=torch.bool)]
    target = torch.randn(G, n, d, generator=gen)
    losses = {}
    for per_group in (False, True):
        fusion = GroupFusion(G, d, feats, masks, "sum", seed=0, item_view=True, item_view_per_group=per_group)
        losses[per_group] = fit_fusion(fusion, torch.arange(G), target, steps=400, lr=0.05)
    assert losses[True] < 0.05 < 0.3 * losses[False]
    # only the groups fitted move: rows of an absent group keep their initial values
    fusion = GroupFusion(G, d, feats, masks, "sum", seed=0, item_view=True, item_view_per_group=True)
    before = fusion.item_emb.weight[2 * n:].detach().clone()
    fit_fusion(fusion, torch.arange(2), target[:2], steps=5, lr=0.05)
    torch.testing.assert_close(fusion.item_emb.weight[2 * n:].detach(), before)
    with pytest.raises(ValueError, match="item_view_per_group"):
        GroupFusion(G, d, feats, masks, "sum", item_view=False, item_view_per_group=True)


def with_features(dataset, seed=0):
    """The planted dataset with synthetic text/image features that carry its item communities."""
    rng = np.random.default_rng(seed)
    d = copy.copy(dataset)
    group = np.array([int(i) // 15 for i in d.item_ids])
    d.item_features = {"text": np.eye(4)[group] @ rng.normal(size=(4, 16)) + 0.1 * rng.normal(size=(d.n_items, 16)),
                       "image": rng.normal(size=(d.n_items, 24))}
    return d


def gfmfr_config(name, **gfmfr):
    return from_dict({
        "model": {"name": name, "dim": 16, "hidden": [8], "lr": 0.5, "item_lr": 5.0, "private_item_lr": 0.05},
        "federation": {"rounds": 6, "local_epochs": 2, "batch_size": 32, "early_stop_patience": 0},
        "eval": {"ks": [10]}, "plugin": "gfmfr",
        "gfmfr": {"groups": 4, "server_steps": 20, "server_every": 1, **gfmfr},
    })


def gfmfr_federation(planted, cfg):
    """A federation of the planted data with synthetic content, GFMFR on; returns (fed, plugin)."""
    from gfmfr.federation.engine import Federation
    from gfmfr.gfmfr.plugin import GFMFR

    data = with_features(planted)
    model = build_model(data.n_items, cfg.model)
    plugin = GFMFR(data, model, cfg)
    return Federation(data, model, cfg, (plugin,)), plugin


@pytest.mark.parametrize("name", sorted(FEDERATED_MODELS))
def test_end_to_end_smoke_every_base_model(planted, name):
    res = run(gfmfr_config(name), dataset=with_features(planted))
    hist = res["history"]
    assert all(np.isfinite(h["loss"]) for h in hist)
    extra = hist[-1]["extra"]
    assert sum(extra["group_sizes"]) == planted.n_users and len(extra["group_sizes"]) == 4
    assert 0 < extra["teacher_mean"] < 1 and extra["teacher_std_over_items"] > 0
    for phase in ("grouping", "fusion", "teacher"):
        assert phase in hist[-1]["seconds"]
    assert hist[1]["bytes_down_per_client"] == build_model(planted.n_items, gfmfr_config(name).model).upload_bytes() \
        + hist[1]["extra"]["bytes_down_teacher_items"]
    base = run(replace(gfmfr_config(name), plugin="none"), dataset=planted)
    assert base["valid"]["HR@10"] > 0  # the base model still runs without the plug-in


def test_grouping_recovers_planted_communities_in_a_federation(planted):
    from gfmfr.federation.engine import Federation
    from gfmfr.gfmfr.plugin import GFMFR

    cfg = gfmfr_config("fcf", grouping="kmeans")
    cfg = replace(cfg, federation=replace(cfg.federation, rounds=12))
    data = with_features(planted)
    model = build_model(data.n_items, cfg.model)
    plugin = GFMFR(data, model, cfg)
    fed = Federation(data, model, cfg, (plugin,))
    fed.fit()
    truth = np.array([int(u[1:]) % 4 for u in data.user_ids])
    assert adjusted_rand_score(truth, plugin.grouping.group) > 0.6
    # what the last server round kept: targets and fused vectors per group, and the members' teacher
    G, n, d = 4, data.n_items, model.dim
    assert plugin.targets.shape == plugin.fused.shape == (G, n, d)
    users = np.flatnonzero(plugin.grouping.group == 0)
    heads = model.head_from_signature(model.head_signature(fed.state.client_params(users)))
    # the signatures were uploaded before FedAvg; FCF's head (the user vector) is private, so they are current
    own = torch.sigmoid(model.head_score(heads, plugin.fused[0].expand(len(users), n, d)))
    torch.testing.assert_close(plugin.preferences[0], own.mean(0))


def test_prepare_wide_signatures_match_plain_pca():
    """More features than clients: the Gram-matrix route keeps the components PCA keeps."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)) @ rng.normal(size=(8, 300)) + 0.01 * rng.normal(size=(40, 300))
    wide = prepare(x, 0.95)
    plain = PCA(n_components=0.95, svd_solver="full").fit_transform(StandardScaler().fit_transform(x))
    assert wide.shape == plain.shape
    np.testing.assert_allclose(np.abs(wide), np.abs(plain), atol=1e-6)  # components agree up to sign


def test_signature_upload_counts_only_what_is_not_uploaded_anyway():
    from gfmfr.gfmfr.plugin import signature_upload_bytes

    fcf = build_model(10, ModelConfig(name="fcf", dim=8))
    assert signature_upload_bytes(fcf) == 4 * 8  # the private user vector
    ncf = build_model(10, ModelConfig(name="fedncf", dim=8, hidden=(4,)))
    assert signature_upload_bytes(ncf) == 4 * (8 + 8)  # user_gmf + user_mlp; the tower is shared


@pytest.mark.parametrize("name", sorted(FEDERATED_MODELS))
def test_scoring_with_group_tables(planted, name):
    """``score_with = "group"``: a grouped client ranks with its group's Q_g in place of the shared
    item table, everything else its own; a client with no group (or an absent group) with the global table."""
    from gfmfr.federation.engine import Federation
    from gfmfr.gfmfr.plugin import GFMFR

    cfg = gfmfr_config(name, score_with="group")
    cfg = replace(cfg, federation=replace(cfg.federation, rounds=2))
    data = with_features(planted)
    model = build_model(data.n_items, cfg.model)
    plugin = GFMFR(data, model, cfg)
    fed = Federation(data, model, cfg, (plugin,))
    users = np.arange(data.n_users)
    torch.testing.assert_close(fed.score(users), fed.state.score(users))  # nothing fused yet
    log = fed.train_round(0)
    assert log.bytes_down_per_client == model.upload_bytes() + log.extra["bytes_down_teacher_items"] \
        + 4 * data.n_items * model.dim
    group = plugin.grouping.group.copy()
    plugin.grouping.group[0] = -1  # user 0: no group
    absent = int(group[1])
    plugin.present[absent] = False  # user 1's group: no participant in the last round
    scores = fed.score(users)
    for u in users:
        if u == 0 or group[u] == absent:
            expected = fed.state.score(users[u : u + 1])
        else:
            expected = fed.state.score(users[u : u + 1], {model.item_table: plugin.fused[group[u]][None]})
        torch.testing.assert_close(scores[u : u + 1], expected)
    # the group tables are not the global one, so the grouped clients' scores differ from the base scoring
    grouped = (np.arange(data.n_users) > 0) & (group != absent)
    assert grouped.any() and not torch.allclose(scores[grouped], fed.state.score(users)[grouped])
    with pytest.raises(ValueError, match="shared item table"):
        fed.state.score(users[:2], {next(iter(model.private_names())): torch.zeros(2)})



def test_server_work_every_k_rounds_keeps_the_last_preferences(planted):
    """``server_every = 3``: grouping, fusion and teacher run in rounds 0, 3, ...; in between the
    clients distil towards the last preferences, and upload no signatures."""
    fed, plugin = gfmfr_federation(planted, gfmfr_config("fcf", server_every=3))
    model = fed.model
    kept = []
    for t in range(5):
        log = fed.train_round(t)
        kept.append(plugin.preferences.clone())
        assert ("fusion" in log.seconds) == (t % 3 == 0)
        assert log.bytes_up_per_client == model.upload_bytes() + (4 * model.dim if t % 3 == 0 else 0)
        assert log.bytes_down_per_client > model.upload_bytes()  # the teacher for this round's items
    torch.testing.assert_close(kept[1], kept[0])
    torch.testing.assert_close(kept[2], kept[0])
    assert not torch.allclose(kept[3], kept[0])
    assert len(plugin.snapshots) == 2


@pytest.mark.parametrize("per_group", [False, True])
def test_mlp_expert_by_view_blocks_equals_the_mlp_on_the_concatenation(per_group):
    """The MLP expert's fast form (first layer applied view by view, broadcast over groups and
    items) is the reference's MLP over the concatenated views."""
    gen = torch.Generator().manual_seed(1)
    n, d = 30, 8
    feats = [torch.randn(n, 6, generator=gen), torch.randn(n, 9, generator=gen)]
    masks = [torch.ones(n, dtype=torch.bool), torch.rand(n, generator=gen) > 0.3]
    fusion = GroupFusion(3, d, feats, masks, "mlp", item_view=True, item_view_per_group=per_group)
    groups, items = torch.tensor([0, 2]), torch.tensor([4, 0, 17, 29])
    for sel in (None, items):
        views, present = fusion.views(groups, sel)
        reference = fusion.mlp((views * present[..., None]).flatten(2))
        torch.testing.assert_close(fusion(groups, sel), reference)


def test_rbf_affinity_matches_pairwise_distances():
    from scipy.spatial.distance import pdist, squareform

    from gfmfr.gfmfr.grouping import rbf_affinity

    x = np.random.default_rng(0).normal(size=(30, 50))
    d = pdist(x)
    expected = np.exp(-squareform(d) ** 2 / (2 * np.median(d) ** 2))
    np.testing.assert_allclose(rbf_affinity(x), expected, rtol=1e-9, atol=1e-12)


def test_default_gfmfr_settings_run_end_to_end(planted):
    """The shipped defaults (KL on the negatives, server work every 5 rounds) on a small federation."""
    from gfmfr.config import GFMFRConfig

    cfg = gfmfr_config("fcf", server_every=GFMFRConfig.server_every, distill_on=GFMFRConfig.distill_on)
    assert (cfg.gfmfr.server_every, cfg.gfmfr.distill_on) == (5, "negatives")
    cfg = replace(cfg, federation=replace(cfg.federation, rounds=7))
    res = run(cfg, dataset=with_features(planted))
    hist = res["history"]
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert [h["round"] for h in hist if "fusion" in h["seconds"]] == [0, 5]
    assert hist[6]["extra"] == {} and hist[5]["extra"]["distill_weight_mean"] > 0
