"""GFMFR: grouping, alignment, fusion, teacher, distillation, and an end-to-end smoke run."""

import copy
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from gfmfr.config import ModelConfig, from_dict
from gfmfr.models import FEDERATED_MODELS, build_model
from gfmfr.plugins import group_fusion
from gfmfr.plugins.group_fusion.distill import bernoulli_kl, cosine_anneal, distill_weight, ema, recentre
from gfmfr.plugins.group_fusion.fusion import EXPERTS, GroupFusion, fit_fusion
from gfmfr.plugins.group_fusion.grouping import Grouping, align, cluster, prepare
from gfmfr.plugins.group_fusion.server import teacher_mean_head, teacher_members
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
    torch.testing.assert_close(
        distill_weight(torch.tensor([2.0]), 50, 100), torch.tensor([2.0 * math.cos(math.pi / 4)])
    )


def test_the_anneal_length_is_gfmfrs_own_not_the_round_cap():
    """A longer round budget (a slow base model) leaves GFMFR's schedule as it was; None is the paper's T."""
    short = from_dict({"federation": {"rounds": 400}})
    long = from_dict({"federation": {"rounds": 1000}})
    assert group_fusion.client_half(short).total_rounds == group_fusion.client_half(long).total_rounds == 400
    paper = from_dict({"federation": {"rounds": 1000}, "gfmfr": {"anneal_rounds": None}})
    assert group_fusion.client_half(paper).total_rounds == 1000
    with pytest.raises(Exception, match="gfmfr.anneal_rounds"):
        from_dict({"gfmfr": {"anneal_rounds": 0}})


def test_distillation_mask_by_hand():
    from gfmfr.federation.batch import Batch
    from gfmfr.plugins.group_fusion.client import distill_mask, masked_mean

    batch = Batch(
        np.array([0, 1]),
        torch.zeros(2, 3, dtype=torch.long),
        torch.tensor([[1.0, 0, 0], [1, 1, 0]]),
        torch.tensor([[1.0, 1, 1], [1, 1, 0]]),
    )
    torch.testing.assert_close(distill_mask(batch, "negatives"), torch.tensor([[0.0, 1, 1], [0, 0, 0]]))
    kl = torch.tensor([[3.0, 1.0, 2.0], [5.0, 7.0, 9.0]])
    torch.testing.assert_close(masked_mean(kl, distill_mask(batch, "all")), torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(masked_mean(kl, distill_mask(batch, "negatives")), torch.tensor([1.5, 0.0]))
    # nominal batch size 4: the second client's two real pairs weigh 1/4 each, not 1/2
    torch.testing.assert_close(masked_mean(kl, distill_mask(batch, "all"), 4), torch.tensor([1.5, 3.0]))
    with pytest.raises(ValueError, match="distill_on"):
        distill_mask(batch, "positives")


def test_recentred_teacher_keeps_the_groups_preferences_at_the_clients_level():
    teacher = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.5, 0.1]])
    student = torch.tensor([[-2.0, -1.0, -3.0], [0.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    logits = torch.logit(recentre(teacher, student, mask))
    # a flat teacher puts every item at the client's own mean logit over the covered pairs
    torch.testing.assert_close(logits[0], torch.full((3,), -1.5))
    # an informed one keeps the group's differences between items, around the client's mean (0)
    torch.testing.assert_close(logits[1], torch.logit(teacher[1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((logits[1] - student[1]).mean(), torch.tensor(0.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", ["group", "client"])
def test_a_flat_teacher_pulls_a_clients_scores_only_at_the_groups_level(level):
    """Round 5's teacher is nearly flat at 0.5 (built from untrained tables); a client whose
    negatives already score low is pulled up by it with ``group``, left alone with ``client``."""
    from types import SimpleNamespace

    from gfmfr.config import GFMFRConfig
    from gfmfr.plugins.group_fusion.client import DistillTerm

    logits = torch.full((1, 4), -2.0, requires_grad=True)
    batch = SimpleNamespace(items=torch.arange(4)[None], labels=torch.zeros(1, 4), mask=torch.ones(1, 4))
    ctx = SimpleNamespace(
        hints=SimpleNamespace(table=torch.full((1, 4), 0.5), row=np.zeros(1, dtype=np.int64)),
        batch=batch,
        logits=logits,
        base_loss=torch.tensor([0.1]),
        state={"gfmfr_ratio": torch.tensor([float("nan")])},
        figures={},
        round=5,
        batch_size=4,
    )
    DistillTerm(GFMFRConfig(teacher_level=level), 400).loss(ctx).sum().backward()
    if level == "group":
        assert (logits.grad < 0).all()  # descending the loss raises every score towards 0.5
    else:
        torch.testing.assert_close(logits.grad, torch.zeros(1, 4), atol=1e-6, rtol=0)


def test_teachers_by_hand():
    model = build_model(2, ModelConfig(name="fcf", dim=2))
    signatures = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two members of group 0: their user vectors
    fused = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # Q_0 for two items
    members = teacher_members(model, signatures, torch.tensor([0, 0]), fused)

    def sig(v):
        return 1 / (1 + math.exp(-v))

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


def test_bad_plugin_settings_fail_before_training(planted):
    from gfmfr.config import ConfigError

    for field, value in (
        ("distill_on", "positives"),
        ("teacher", "best"),
        ("grouping", "dbscan"),
        ("fusion", "concat"),
    ):
        with pytest.raises(ConfigError, match=f"gfmfr.{field}: must be one of"):  # on load, before any training
            gfmfr_config("fcf", **{field: value})


def with_features(dataset, seed=0):
    """The planted dataset with synthetic text/image features that carry its item communities."""
    rng = np.random.default_rng(seed)
    d = copy.copy(dataset)
    group = np.array([int(i) // 15 for i in d.item_ids])
    d.item_features = {
        "text": np.eye(4)[group] @ rng.normal(size=(4, 16)) + 0.1 * rng.normal(size=(d.n_items, 16)),
        "image": rng.normal(size=(d.n_items, 24)),
    }
    return d


def gfmfr_config(name, **gfmfr):
    return from_dict(
        {
            "model": {"name": name, "dim": 16, "hidden": [8], "lr": 0.5, "item_lr": 5.0, "private_item_lr": 0.05},
            "federation": {"rounds": 6, "local_epochs": 2, "batch_size": 32, "early_stop_patience": 0},
            "eval": {"ks": [10]},
            "plugin": "gfmfr",
            "gfmfr": {"groups": 4, "server_steps": 20, "server_every": 1, **gfmfr},
        }
    )


def gfmfr_federation(planted, cfg):
    """A federation of the planted data with synthetic content, GFMFR on; returns (fed, plugin)."""
    from gfmfr.federation.engine import Federation

    data = with_features(planted)
    model = build_model(data.n_items, cfg.model)
    plugin = group_fusion.build(data, model, cfg)
    return Federation(data, model, cfg, (plugin,)), plugin.server


@pytest.mark.parametrize("name", sorted(FEDERATED_MODELS))
def test_end_to_end_smoke_every_base_model(planted, name):
    res = run(gfmfr_config(name), dataset=with_features(planted))
    hist = res["history"]
    assert all(np.isfinite(h["loss"]) for h in hist)
    extra = hist[-1]["extra"]
    assert sum(extra["group_sizes"]) == planted.n_users and len(extra["group_sizes"]) == 4
    assert 0 < extra["teacher_mean"] < 1 and extra["teacher_std_over_items"] > 0
    assert 0 < extra["content_share"] < 1  # the content prior moved every row part of the way
    for phase in ("grouping", "fusion", "teacher"):
        assert phase in hist[-1]["seconds"]
    size = build_model(planted.n_items, gfmfr_config(name).model).upload_bytes()
    assert hist[0]["bytes_down_per_client"] == size  # no preferences yet
    assert hist[1]["bytes_down_per_client"] == size + 4 * planted.n_items  # its group's preference row
    base = run(replace(gfmfr_config(name), plugin="none"), dataset=planted)
    assert base["valid"]["HR@10"] > 0  # the base model still runs without the plug-in


def test_grouping_recovers_planted_communities_in_a_federation(planted):
    cfg = gfmfr_config("fcf", grouping="kmeans")
    cfg = replace(cfg, federation=replace(cfg.federation, rounds=12))
    fed, plugin = gfmfr_federation(planted, cfg)
    data, model = fed.dataset, fed.model
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


def test_grouping_beyond_the_exact_limit_fits_pca_on_the_landmarks():
    """Beyond ``exact_grouping_max`` participants the PCA is fitted on the landmark participants only
    (every one projected): its components are those of the landmarks' own PCA, and the planted
    communities of wide signatures (more features than landmarks) are still found."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from gfmfr.plugins.group_fusion.grouping import Grouping, landmark_rows

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, 900)
    x = (2 * rng.normal(size=(4, 6)))[truth] @ rng.normal(size=(6, 400)) + rng.normal(size=(900, 400))
    rows = landmark_rows(900, 150, seed=7)
    z = StandardScaler().fit_transform(x)
    expected = PCA(n_components=0.95, svd_solver="full").fit(z[rows]).transform(z)
    np.testing.assert_allclose(np.abs(prepare(x, 0.95, rows)), np.abs(expected), atol=1e-8)
    assert prepare(x, 0.95, rows).shape[1] < prepare(x, 0.95).shape[1]  # fewer rows, fewer components
    grouping = Grouping(900, 4, "spectral", 0.95, landmarks=150, exact_max=300)
    labels = grouping.update(np.arange(900), x, seed=7)
    assert adjusted_rand_score(truth, labels) > 0.95


def test_teacher_beyond_the_exact_limit_is_scored_by_the_landmark_members():
    """Up to ``exact_grouping_max`` participants every member's head scores its group's preferences;
    beyond, the grouping's landmark participants do, plus every member of a group without one."""
    from types import SimpleNamespace

    from gfmfr.config import GFMFRConfig
    from gfmfr.plugins.group_fusion.grouping import Grouping, landmark_rows
    from gfmfr.plugins.group_fusion.server import GFMFRServer

    def fake_server(exact_max: int) -> SimpleNamespace:
        cfg = GFMFRConfig(exact_grouping_max=exact_max, landmarks=6)
        return SimpleNamespace(cfg=cfg, seed=4, grouping=Grouping(62, 4, landmarks=6, exact_max=exact_max))

    rows = torch.tensor([0, 1, 2] * 20 + [3, 3])  # group 3: two members
    server = fake_server(100)
    assert torch.equal(GFMFRServer.teacher_voters(server, rows, 5), torch.arange(62))
    server = fake_server(10)
    voters = GFMFRServer.teacher_voters(server, rows, 5)
    picked = set(landmark_rows(62, 6, 9).tolist())
    lonely = {g for g in range(4) if not any(rows[i] == g for i in picked)}
    assert lonely == {3}  # the small group has no landmark
    assert set(voters.tolist()) == picked | {i for i in range(62) if int(rows[i]) in lonely}
    assert set(rows[voters].tolist()) == {0, 1, 2, 3}  # every group keeps a voter


def test_signature_upload_counts_only_what_is_not_uploaded_anyway():
    from gfmfr.plugins.group_fusion.server import signature_upload_bytes

    fcf = build_model(10, ModelConfig(name="fcf", dim=8))
    assert signature_upload_bytes(fcf) == 4 * 8  # the private user vector
    ncf = build_model(10, ModelConfig(name="fedncf", dim=8, hidden=(4,)))
    assert signature_upload_bytes(ncf) == 4 * (8 + 8)  # user_gmf + user_mlp; the tower is shared


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
        assert log.bytes_down_per_client == model.upload_bytes() + (4 * fed.dataset.n_items if t else 0)
    torch.testing.assert_close(kept[1], kept[0])
    torch.testing.assert_close(kept[2], kept[0])
    assert not torch.allclose(kept[3], kept[0])
    assert len(plugin.snapshots) == 2


def test_mlp_expert_by_view_blocks_equals_the_mlp_on_the_concatenation():
    """The MLP expert's fast form (first layer applied view by view, broadcast over groups and
    items) is the reference's MLP over the concatenated views."""
    gen = torch.Generator().manual_seed(1)
    n, d = 30, 8
    feats = [torch.randn(n, 6, generator=gen), torch.randn(n, 9, generator=gen)]
    masks = [torch.ones(n, dtype=torch.bool), torch.rand(n, generator=gen) > 0.3]
    fusion = GroupFusion(3, d, feats, masks, "mlp", item_view=True)
    groups, items = torch.tensor([0, 2]), torch.tensor([4, 0, 17, 29])
    for sel in (None, items):
        views, present = fusion.views(groups, sel)
        reference = fusion.mlp((views * present[..., None]).flatten(2))
        torch.testing.assert_close(fusion(groups, sel), reference)


def test_nystrom_grouping_finds_the_groups_exact_spectral_grouping_finds():
    """Beyond ``gfmfr.landmarks`` participants, spectral grouping uses the Nystrom approximation: on five
    planted communities it recovers them as the exact method does; with landmarks covering every
    participant, its embedding spans the exact normalised affinity's top eigenvectors."""
    from gfmfr.plugins.group_fusion.grouping import nystrom_embedding

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 1200)
    x = prepare(3 * rng.normal(size=(5, 12))[truth] + rng.normal(size=(1200, 12)))
    exact = cluster(x, 5, "spectral", seed=0)
    approx = cluster(x, 5, "spectral", seed=0, landmarks=200)
    assert adjusted_rand_score(truth, approx) > 0.95 and adjusted_rand_score(exact, approx) > 0.95
    assert (cluster(x, 5, "spectral", seed=0, landmarks=1200) == exact).all()  # not beyond: exact
    small = x[:150]
    from gfmfr.plugins.group_fusion.grouping import rbf_affinity

    a = rbf_affinity(small)
    d = a.sum(1)
    values, vectors = np.linalg.eigh(a / np.sqrt(np.outer(d, d)))
    top = vectors[:, -5:]
    u = nystrom_embedding(small, 5, 150, seed=0)  # every row a landmark: the exact affinity
    np.testing.assert_allclose(np.abs(top.T @ u).sum(1), 1.0, atol=1e-6)  # the same subspace, column by column
    blocked = nystrom_embedding(x, 5, 200, seed=0, block=97)  # formed 97 rows at a time: the same vectors
    np.testing.assert_allclose(np.abs(blocked), np.abs(nystrom_embedding(x, 5, 200, seed=0)), atol=1e-10)


@pytest.mark.parametrize("n, groups, planted", [(400, 5, True), (600, 5, False), (300, 3, False), (6, 5, False)])
def test_exact_spectral_grouping_gives_scikit_learns_labels(n, groups, planted):
    """Exact spectral grouping (Lanczos on the normalised affinity, then cluster_qr) labels every
    participant as scikit-learn's SpectralClustering with ARPACK does, label for label, on planted
    communities and on a blob with no cluster structure (what heads' signatures look like)."""
    from sklearn.cluster import SpectralClustering

    from gfmfr.plugins.group_fusion.grouping import rbf_affinity

    rng = np.random.default_rng(n)
    centres = 3 * rng.normal(size=(groups, 20)) if planted else np.zeros((groups, 20))
    x = prepare(centres[rng.integers(0, groups, n)] + rng.normal(size=(n, 20)))
    for seed in (0, 1):
        reference = SpectralClustering(
            n_clusters=groups, affinity="precomputed", random_state=seed, assign_labels="cluster_qr"
        ).fit_predict(rbf_affinity(x))
        np.testing.assert_array_equal(cluster(x, groups, "spectral", seed=seed), reference)


def test_rbf_affinity_matches_pairwise_distances():
    from scipy.spatial.distance import pdist, squareform

    from gfmfr.plugins.group_fusion.grouping import rbf_affinity

    x = np.random.default_rng(0).normal(size=(30, 50))
    d = pdist(x)
    expected = np.exp(-(squareform(d) ** 2) / (2 * np.median(d) ** 2))
    np.testing.assert_allclose(rbf_affinity(x), expected, rtol=1e-9, atol=1e-12)


def test_uploads_held_in_files_give_the_same_rounds(planted, monkeypatch):
    """With ``runtime.hold_mb = 0`` every chunk of a server round's uploads waits in a temporary file
    until the participants are grouped: the same groups, preferences and tables as held in memory, and
    no file is left behind."""
    import gfmfr.plugins.group_fusion.server as server_module

    written = []
    save = server_module.save_file
    monkeypatch.setattr(server_module, "save_file", lambda t, path: (written.append(path), save(t, path)))
    results = {}
    for hold in (4096, 0):
        cfg = gfmfr_config("fcf")
        cfg = replace(cfg, runtime=replace(cfg.runtime, hold_mb=hold, client_chunk=24))
        fed, server = gfmfr_federation(planted, cfg)
        for t in range(3):
            fed.train_round(t)
        results[hold] = (server.grouping.group.copy(), server.preferences.clone(), fed.state.shared["item"].clone())
        assert server._held.folder is None
    assert len(written) == 3 * 4 and not any(Path(p).exists() for p in written)  # 80 users: 4 chunks a round
    np.testing.assert_array_equal(results[0][0], results[4096][0])
    assert torch.equal(results[0][1], results[4096][1]) and torch.equal(results[0][2], results[4096][2])


def test_default_gfmfr_settings_run_end_to_end(planted):
    """The shipped defaults (KL on the negatives, server work every 5 rounds, score-space fusion with
    item-view dropout) on a small federation."""
    from gfmfr.config import GFMFRConfig

    cfg = gfmfr_config("fcf", server_every=GFMFRConfig.server_every, distill_on=GFMFRConfig.distill_on)
    assert (cfg.gfmfr.server_every, cfg.gfmfr.distill_on) == (5, "negatives")
    assert (cfg.gfmfr.fusion_loss, cfg.gfmfr.item_view_dropout) == ("score", 0.25)
    cfg = replace(cfg, federation=replace(cfg.federation, rounds=7))
    res = run(cfg, dataset=with_features(planted))
    hist = res["history"]
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert [h["round"] for h in hist if "fusion" in h["seconds"]] == [0, 5]
    assert hist[6]["extra"] == {} and hist[5]["extra"]["distill_weight_mean"] > 0


@pytest.mark.parametrize("name", sorted(FEDERATED_MODELS))
@pytest.mark.parametrize("prior", [0.0, 20.0])
def test_batched_equals_one_client_step_with_gfmfr(planted, name, prior):
    """With the plug-in on (hints, the EMA ratio in each client's state, signatures in server rounds), the
    batched engine and the one-client step, one client after another, agree over 4 rounds. With the
    content prior, over one server round that moves the table: later ones differ by more than
    round-off, as the fusion's Adam steps (each about its learning rate, whatever the gradient's size)
    turn float32 round-off in the group targets into differences the prior writes into the table."""
    from tests.test_model_contract import assert_batched_equals_one_client_at_a_time

    cfg = gfmfr_config(
        name, server_every=1 if prior else 2, teacher_level="client" if name == "fcf" else "group", content_prior=prior
    )
    data = with_features(planted)
    model = build_model(data.n_items, cfg.model)
    assert_batched_equals_one_client_at_a_time(
        data, model, cfg, (group_fusion.build(data, model, cfg),), rounds=2 if prior else 4
    )


def test_score_space_fusion_loss_by_hand():
    from gfmfr.plugins.group_fusion.server import sample_members, score_error

    model = build_model(3, ModelConfig(name="fcf", dim=2))
    heads = {"user": torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])}  # three members
    rows = torch.tensor([0, 0, 1])  # the first two in fusion row 0, the third in row 1
    q = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[2.0, 0.0], [1.0, 1.0]]])  # [G'=2, B=2, d=2]
    c = torch.zeros(2, 2, 2)
    # scores u . (q - c): member 0 on row 0: 1, 0; member 1: 2, 0; member 2 on row 1: 2, 2
    expected = (1 + 0 + 4 + 0 + 4 + 4) / 6
    assert float(score_error(model, heads, rows)(q, c)) == pytest.approx(expected)
    # an error along a direction no member reads costs nothing
    assert (
        float(
            score_error(model, {"user": torch.tensor([[1.0, 0.0]])}, torch.tensor([0]))(
                torch.tensor([[[0.0, 5.0]]]), torch.zeros(1, 1, 2)
            )
        )
        == 0.0
    )
    labels = torch.tensor([0, 1, 1, -1, 0])
    picked = sample_members(labels, 3, 4, torch.Generator().manual_seed(0))
    assert len(picked) == 8 and set(labels[picked[:4]].tolist()) == {0} and set(labels[picked[4:]].tolist()) == {1}


@pytest.mark.parametrize("name", ["fcf", "pfedrec", "fedrap"])
def test_score_space_loss_of_linear_heads_equals_scoring_every_member(name, monkeypatch):
    """FCF's, PFedRec's and FedRAP's (dot) heads are linear in the item vector: the loss from the rows' d x d second
    moments equals (value and gradient) the loss from scoring every member, which other heads use."""
    from gfmfr.plugins.group_fusion.server import score_error

    model = build_model(7, ModelConfig(name=name, dim=6))
    gen = torch.Generator().manual_seed(0)
    heads = model.head_from_signature(
        torch.randn(
            9,
            model.head_signature({n: torch.zeros(1, *model.param_specs()[n].shape) for n in model.head_params()}).shape[
                1
            ],
            generator=gen,
        )
    )
    rows = torch.tensor([0, 2, 2, 1, 0, 2, 1, 1, 0])
    q, c = torch.randn(3, 7, 6, generator=gen, requires_grad=True), torch.randn(3, 7, 6, generator=gen)
    fast = score_error(model, heads, rows)(q, c)
    (g_fast,) = torch.autograd.grad(fast, q)
    monkeypatch.setattr(type(model), "head_weights", lambda self, p: None)
    slow = score_error(model, heads, rows)(q, c)
    (g_slow,) = torch.autograd.grad(slow, q)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(g_fast, g_slow)


def test_item_view_dropout_hides_the_item_view_and_new_items_are_content_alone():
    gen = torch.Generator().manual_seed(0)
    feats, masks = [torch.randn(12, 5, generator=gen)], [torch.ones(12, dtype=torch.bool)]
    fusion = GroupFusion(2, 4, feats, masks, "mlp", item_view=True)
    items, groups = torch.arange(12), torch.arange(2)
    drop = torch.zeros(12, dtype=torch.bool)
    drop[:6] = True
    with torch.no_grad():
        before = fusion(groups, items, drop=drop)
        fusion.item_emb.weight.add_(1.0)  # only the items that keep their view move
        after = fusion(groups, items, drop=drop)
        assert torch.equal(before[:, :6], after[:, :6]) and not torch.allclose(before[:, 6:], after[:, 6:])
        alone = fusion(groups, content=([fusion.x0], [fusion.m0]))  # new items with the same content
        torch.testing.assert_close(alone, fusion(groups, items, drop=torch.ones(12, dtype=torch.bool)))
    target = torch.randn(2, 12, 4, generator=gen)
    loss = fit_fusion(fusion, groups, target, steps=5, lr=0.01, item_view_dropout=0.5)
    assert math.isfinite(loss)


def test_content_prior_moves_each_row_by_the_clients_that_trained_it(planted):
    """After a server round item i's row is C_i + kappa / (kappa + t_i) (Q_i - C_i): Q the groups' fused
    vectors from content alone (two items with the same content get the same Q, whatever their ID rows),
    t_i the participants that trained row i in the round."""
    tables = {}
    for kappa in (0.0, 5.0, 1e9):
        fed, plugin = gfmfr_federation(planted, gfmfr_config("fcf", content_prior=kappa))
        twins = fed.dataset.item_features
        for m in twins:
            twins[m] = twins[m].copy()
            twins[m][1] = twins[m][0]
        plugin.__init__(fed.dataset, fed.model, gfmfr_config("fcf", content_prior=kappa))
        fed.train_round(0)
        tables[kappa] = fed.state.shared["item"].clone()
    base, content = tables[0.0], tables[1e9]
    torch.testing.assert_close(content[0], content[1], atol=1e-5, rtol=1e-5)  # content alone
    assert not torch.allclose(base[0], base[1])
    gap, moved = content - base, tables[5.0] - base
    share = (moved * gap).sum(1) / gap.square().sum(1)
    torch.testing.assert_close(moved, share[:, None] * gap, atol=1e-5, rtol=1e-4)
    touches = 5.0 * (1 - share) / share  # t_i: a whole number of the 80 participants
    assert ((touches - touches.round()).abs() < 1e-2).all() and touches.max() <= planted.n_users
    assert touches.min() >= 1 and touches.float().std() > 0


def test_content_prior_lifts_a_sparse_federation_whose_content_knows_the_items(planted):
    """Four interactions per user, item content that carries the item communities: FCF's item rows are
    mostly noise, and pulling them to the content vectors lifts validation NDCG@10 on both seeds by more
    than a tenth of its level without the pull."""
    from tests.conftest import dataset_from_frame, planted_frame

    sparse = with_features(dataset_from_frame(planted_frame(n_users=120, per_user=6)))
    lifts = []
    for seed in (0, 1):
        scores = {}
        for pull in (0.0, 20.0):
            cfg = gfmfr_config("fcf", content_prior=pull, server_every=2)
            cfg = replace(cfg, seed=seed, federation=replace(cfg.federation, rounds=30, local_epochs=1))
            scores[pull] = run(cfg, dataset=sparse)["valid"]["NDCG@10"]
        lifts.append(scores[20.0] / scores[0.0] - 1)
    assert min(lifts) > 0.1, lifts


def test_a_server_round_without_accepted_uploads_keeps_the_last_groups(planted):
    """When every upload of a server round is rejected (a diverging trial of `gfmfr tune`), GFMFR's
    server has nothing to group: its groups and preferences stay, and the run goes on."""
    fed, server = gfmfr_federation(planted, gfmfr_config("fcf"))
    fed.train_round(0)
    groups, preferences = server.grouping.group.copy(), server.preferences.clone()
    report = server.end_round(fed.model, 1)  # no upload observed this round
    assert report.bytes_down == 4 * planted.n_items
    assert np.array_equal(server.grouping.group, groups) and torch.equal(server.preferences, preferences)
    assert server.move_shared(fed.state.shared, 1) is fed.state.shared  # the content prior waits too
