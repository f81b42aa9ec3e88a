"""The configuration's schema: one frozen dataclass per section, every field with its default and
its docstring (``docs/config.md`` is generated from them by ``python -m gfmfr.docs``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A configuration value or key that does not exist or does not parse."""


@dataclass(frozen=True)
class DataConfig:
    """Where the interactions come from and how they are preprocessed."""

    dataset: str = "ml-100k"
    """Built-in name (``ml-100k``) or a folder (generic, FedVLR/GFMFR or RecBole atomic layout)."""
    content: str | None = None
    """Folder with ``items.csv`` (``item_id,text,image``) and the image files it names."""
    features: Literal["precomputed", "encoded", "both"] = "precomputed"
    """For a modality the data has both as a precomputed feature file (``text_features.npy``, ...) and as
    raw content (``items.csv``'s text, images): ``precomputed`` uses the file, ``encoded`` the project's
    own encoder on the raw content (:mod:`gfmfr.data.encoders`), ``both`` the two side by side. A
    modality with only one of them uses that one."""
    rating_threshold: float | None = None
    """Ratings ``>= threshold`` are positives; ``None`` makes every rating a positive."""
    kcore: int = 0
    """Iteratively keep users and items with at least this many positives (0: off)."""
    duplicates: Literal["first", "error"] = "first"
    """Repeated (user, item) pairs: ``first`` keeps the earliest and counts the rest, ``error`` raises."""
    split: Literal["auto", "leave-one-out", "cold-items"] = "auto"
    """``auto``: the source's own split where it gives one (a ``split_label`` column: 0 train, 1
    validation, 2 test, as the FedVLR/GFMFR layout publishes it), else ``leave-one-out``.
    ``leave-one-out``: each user's latest item is the test, the one before it validation (by timestamp;
    ties keep file order), whatever split the source gives.
    ``cold-items``: a seeded ``cold_item_fraction`` of the items and every interaction with them leave
    training (the server knows only their content); each user's latest interaction with a cold item is
    the test, the one before it validation (users with none are not evaluated, with one only tested)."""
    cold_item_fraction: float = 0.2
    """Share of the items held out as cold items by the ``cold-items`` split."""
    split_seed: int = 0
    """Seed of the cold-item draw; fixed apart from the run seed, so that seeds compare on one split."""


@dataclass(frozen=True)
class ModelConfig:
    """The base recommender and its optimiser settings (docs/method.md, 'Base models')."""

    name: Literal["fcf", "fedncf", "pfedrec", "fedrap", "popularity", "content-knn", "random"] = "fedrap"
    """A federated base model (``fcf``, ``fedncf``, ``pfedrec``, ``fedrap``) or a baseline that scores without
    training: ``popularity``, ``content-knn`` (mean content cosine to the user's items, over
    ``multimodal.modalities``) or ``random``."""
    dim: int = 64
    """Latent size d of user and item vectors."""
    hidden: tuple[int, ...] = (32,)
    """Hidden layer widths of MLP heads (FedNCF tower, FedRAP MLP head)."""
    lr: float | None = None
    """SGD learning rate of user vectors and heads (None: the model's tuned default)."""
    item_lr: float | None = None
    """SGD learning rate of shared item tables; FedAvg dilutes a row's update by the share of clients
    touching it, hence large values (None: the model's tuned default)."""
    private_item_lr: float | None = None
    """SGD learning rate of private item tables, FedRAP's D_u (None: the model's tuned default)."""
    weight_decay: float = 1e-4
    """L2 weight decay on every parameter (SGD-style, applied each local step)."""
    fedrap_lambda: float = 0.1
    """FedRAP v1: weight of the -||D_u - C||^2 term once ramped up (lambda_t = v1 tanh(t/10))."""
    fedrap_mu: float = 1e-3
    """FedRAP v2: weight of the ||C||_1 sparsity term once ramped up (mu_t = v2 tanh(t/10))."""
    init_std: float = 0.1
    """Standard deviation of the normal initialisation of embeddings."""


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, client sampling, local training and aggregation (docs/method.md, 'One round t')."""

    rounds: int = 1000
    """Maximum number of communication rounds; early stopping ends runs first (the base models peak
    between rounds 40 and 700 on the datasets measured). Under DP without ``privacy.noise_multiplier``
    the noise is calibrated over this many rounds: set it to the rounds the run should last."""
    client_fraction: float = 1.0
    """Fraction of clients sampled per round (seeded)."""
    local_epochs: int = 1
    """Local epochs per round over the client's positives and sampled negatives. One: with more, every
    base model overfits its few local interactions within a round (the reference code's 5 stall near
    popularity)."""
    batch_size: int = 256
    """Local minibatch size."""
    num_negatives: int = 4
    """Sampled non-interacted items per positive, resampled every round."""
    weighted_aggregation: bool = False
    """FedAvg weighted by local sample count instead of a plain mean over participants."""
    reject_norm: float | None = 100.0
    """Reject a client's upload whose update norm per local step (item tables whole) exceeds this many
    times the median of its round (honest ML-100K clients reach 13x); 0: reject only non-finite
    uploads; None: accept every upload unchecked."""
    dropout: float = 0.0
    """Fraction of the sampled clients that drop out of a round (seeded by seed and round): they send
    nothing, and keep the private state they had."""
    upload: Literal["rows", "dense"] = "rows"
    """What a client sends of each shared item table over a network (Flower backend): ``rows``, the
    rows it trained this round (its positives and sampled negatives: the server learns which items
    it touched, not which were positives); or ``dense``, the whole table (no item ids, n_items rows
    per client). The same average either way; the in-process engine always works on rows."""
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam", "fedyogi"] = "fedavg"
    """How the server turns the participants' average into the next global parameters (Reddi et al.,
    ICLR 2021): ``fedavg`` (the average itself, at ``server_lr = 1``), ``fedavgm`` (server momentum),
    ``fedadam`` or ``fedyogi``. Item tables are stepped row-wise: untrained rows keep their state."""
    server_lr: float = 1.0
    """Server learning rate eta on the pseudo-gradient (average - current)."""
    server_momentum: float = 0.9
    """FedAvgM's momentum beta, and beta1 of FedAdam / FedYogi."""
    server_beta2: float = 0.99
    """beta2 of FedAdam / FedYogi."""
    server_tau: float = 1e-3
    """Adaptivity tau of FedAdam / FedYogi (added to sqrt(v); v starts at tau^2)."""
    eval_every: int = 1
    """Validate every N rounds (the last round is always validated)."""
    early_stop_patience: int = 60
    """Stop at a validation this many rounds after the best one (0: never stop early). Validation on a
    few hundred users is noisy from round to round and training stalls for tens of rounds before it
    improves again, hence a long patience."""


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) with its privacy
    spent from Google's ``dp-accounting`` (RDP), and noise on GFMFR's head signatures."""

    mode: Literal["off", "central", "local"] = "off"
    """``central``: every client's whole update (item tables whole) is clipped to L2 norm ``clip`` and
    the server adds Gaussian noise of std ``noise_multiplier * clip`` to their sum, divided by the
    expected number of participants; with ``client_fraction < 1`` clients are sampled by Poisson
    sampling, which the accounting amplifies. ``local``: each client clips and adds that noise to its
    own dense update before it leaves (the server learns nothing exact; each client's release is a
    Gaussian mechanism of sensitivity 2 clip, with no amplification). Under DP uploads are dense,
    the norm screening is off (clipping bounds every upload; non-finite ones are still rejected) and
    FedAvg is a plain mean."""
    clip: float = 10.0
    """L2 bound C on a client's update per round, every shared parameter together. On ML-100K the
    median FCF update norm grows from 5 (round 0) to 20 (round 60); 10 clips about half of them."""
    noise_multiplier: float | None = None
    """Noise std over ``clip`` (sigma). None: the smallest sigma whose privacy spent after
    ``federation.rounds`` rounds is ``target_epsilon``."""
    target_epsilon: float | None = None
    """Stop before a round would take the privacy spent, epsilon at ``delta``, past this (None: never)."""
    delta: float | None = None
    """The delta of the reported (epsilon, delta); None: 1 / clients^1.1, below 1 / clients."""
    signature_clip: float = 5.0
    """L2 bound on a head signature a plug-in asks for (GFMFR), when ``signature_noise > 0``. A clip
    far below the signatures' norms shrinks the heads the teacher scores with (FCF's user vectors have a
    median norm of 5.4 on ML-100K at round 30)."""
    signature_noise: float = 0.0
    """Gaussian noise on each uploaded head signature, std this times ``signature_clip``, added by the
    client after clipping (0: sent as it is). The mitigation of the signature attack
    (benchmarks/privacy_audit.py); required under DP when a plug-in uploads signatures, whose releases
    are then accounted as Gaussian mechanisms of sensitivity 2 ``signature_clip``."""
    secure_aggregation: bool = False
    """Flower backend: sum the nodes' updates under Flower's SecAgg+ (Bell et al., CCS 2020), so that
    the server learns only the sum over every node of a round, never one node's (docs/privacy.md).
    Every node takes part in every round; uploads are dense (no item ids) and quantised by Flower.
    GFMFR's server rounds send the head signatures in the clear (clip and noise them with
    ``signature_noise``) and sum the groups' item tables under SecAgg+."""
    secagg_neighbours: int = 16
    """SecAgg+: how many of a round's nodes (itself included; all of them when fewer) each node splits its
    secrets among. A node's cost grows with its neighbours, not with the federation: with every one of
    100 nodes a neighbour, Flower's secret sharing costs a node 3 s a round; with 11, 0.08 s
    (benchmarks/secagg_cost.py)."""
    secagg_threshold: float = 0.5
    """SecAgg+: the share of a node's neighbours needed to unmask the sum; a round survives the loss of
    up to 1 - this share of each node's neighbours, and a coalition smaller than it learns nothing."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol (docs/method.md, 'Evaluation')."""

    protocol: Literal["full", "sampled"] = "full"
    """``full``: rank against every item not in the user's training data; ``sampled``: against 99 negatives."""
    ks: tuple[int, ...] = (10, 20, 50)
    """Cut-offs K for HR@K, NDCG@K, Recall@K and MRR@K."""
    sampled_negatives: int = 99
    """Negatives per user in the sampled protocol (separate draws for validation and test)."""
    select_metric: str = "NDCG@10"
    """Validation metric that selects the best round; test is reported at that round."""
    valid_users: int | None = 10000
    """Validate (select the best round) on a seeded sample of about this many users, each user in it
    with probability ``valid_users / n_users``: the same users every round and on every Flower node.
    Full ranking scores users x items at every validation (5e10 scores at a million users and 50,000
    items); with the sample a validation costs the same at any number of users. Test is always over
    every user. None: every user validates (as on every dataset measured here, all smaller)."""
    tail_max_count: int = 10
    """Also report every metric over the users whose held-out item is long-tail, with at most this many
    training interactions, as ``tail NDCG@10`` etc. (and ``tail users``); 0: no tail slice."""
    cold_source: Literal["auto", "gfmfr", "mmx", "ifedrec", "knn", "random"] = "auto"
    """On the ``cold-items`` split, where cold items' vectors come from (:mod:`gfmfr.coldstart`):
    ``gfmfr`` the group fusion model's Q_g(i) for the user's group, ``mmx`` MM-X's content projection,
    ``ifedrec`` a network fitted on the server from content to the global item table, ``knn`` content
    cosine to the user's training items (no vectors), ``random`` random vectors (the floor). ``auto``:
    ``gfmfr`` with the GFMFR plug-in, ``mmx`` with the MM-X wrapper, else ``ifedrec``. It selects the
    best round; the others are reported beside it on the test split."""


@dataclass(frozen=True)
class GFMFRConfig:
    """The GFMFR plug-in (docs/method.md, steps 4-8), used when ``plugin = "gfmfr"``."""

    groups: int = 5
    """Number of client groups G."""
    grouping: Literal["spectral", "kmeans"] = "spectral"
    """``spectral`` (RBF affinity, median-distance bandwidth) or ``kmeans``."""
    pca_variance: float | None = 0.95
    """Variance kept by PCA of the standardised signatures; ``None`` skips PCA."""
    exact_grouping_max: int = 5000
    """Participants up to which grouping is exact (spectral clustering's affinity matrix: 200 MB at 5,000,
    80 GB at 100,000); beyond, the signatures' PCA is fitted on ``landmarks`` participants and spectral
    clustering uses the Nystrom approximation over them. Every dataset measured so far (at most 2,928
    participants) is grouped exactly at the default."""
    landmarks: int = 1000
    """Seeded landmark participants of the PCA and the Nystrom approximation beyond
    ``exact_grouping_max``: time and memory linear in participants."""
    modalities: tuple[Literal["text", "image"], ...] = ("text", "image")
    """Content modalities fused (any non-empty subset of those the dataset has)."""
    fusion: Literal["sum", "mlp", "gate", "attention", "mixture"] = "mlp"
    """Fusion expert: ``sum``, ``mlp``, ``gate``, ``attention`` or ``mixture``."""
    item_view: bool = True
    """Add a learnable server-side item embedding as a fusion view (False: content and group views only)."""
    server_steps: int = 10
    """Adam steps of fusion training per server round, each on a minibatch of 2,048 items (all of
    ML-100K's 1,682: one step is one epoch there). Warm-started, so they add up over rounds; 50 cost
    as much as the clients' training on ML-100K and were no better in the ablation."""
    server_every: int = 5
    """Run the server work (grouping, group targets, fusion, teacher, content pull) every N rounds, from
    round 0; in between, clients distil towards the last preferences and upload no signatures. A teacher
    that moves slowly is what makes the KL term on the negatives help, and it costs a fifth."""
    server_lr: float = 0.01
    """Adam learning rate of the fusion model."""
    fusion_loss: Literal["mse", "score"] = "score"
    """What fitting Q_g(i) to the group target C_g(i) minimises: ``score``, (head_u(Q_g(i)) -
    head_u(C_g(i)))^2 over up to ``score_members`` sampled members u of the group, the error in the
    scores the members (and the teacher) read off the vectors; ``mse``, ||Q_g(i) - C_g(i)||^2 (the
    paper's)."""
    score_members: int = 16
    """Members sampled per group and server round by ``fusion_loss = "score"``."""
    item_view_dropout: float = 0.25
    """Share of each fusion step's items fitted without their item-ID view (DropoutNet's input dropout,
    Volkovs et al., NeurIPS 2017), so that Q_g(i) from content alone, all an unseen item has, is fitted
    too: it puts new and cold items' vectors on the known items' scale (all-items NDCG@10 of cold items
    0.0209 against 0.0000 on FCF). 0: the item view is always there (the paper's)."""
    distill_on: Literal["all", "negatives"] = "negatives"
    """Training pairs the KL term covers: ``negatives``, only the sampled unobserved items, where the
    group's preference is information the client lacks; or ``all``, every training pair (the paper's),
    which pulls a client's own positives towards a group average."""
    ema_decay: float = 0.9
    """Decay of the moving average r_t of L_base / L_KL."""
    anneal_rounds: int | None = 400
    """T of the distillation weight's cosine anneal, w_t = r_t cos(pi t / 2T) (docs/method.md step 8),
    reaching zero at round T. Kept apart from the round cap ``federation.rounds`` so that a longer
    budget for a slow base model does not change GFMFR's schedule; 400 is the T of every measured
    GFMFR run. None: ``federation.rounds`` (the paper's T, the last round)."""
    teacher: Literal["members", "mean_head"] = "members"
    """Group preference p_g(i): ``members`` averages the members' predicted probabilities on Q_g(i);
    ``mean_head`` scores Q_g(i) with the members' averaged head parameters (docs/method.md step 7)."""
    teacher_level: Literal["group", "client"] = "group"
    """The probability level the KL term pulls a client towards. ``group``: the group's own p_g(i) (the
    paper's). ``client``: p_g(i) recentred per client and batch, in logit space, on the client's own
    mean logit over the covered pairs: only which items the group prefers is passed on, so the first
    teachers, built from nearly untrained tables (p about 0.4-0.5 for every item), do not hold the
    client's negatives up. It reaches a given quality in fewer rounds on FCF and PFedRec."""
    max_ratio: float = 1.0
    """Cap on L_base / L_KL: when student and teacher already agree, the raw ratio explodes."""
    content_dim: int | None = 128
    """Server-side PCA of each modality's frozen features to this many dimensions (None: keep all)."""
    content_prior: float = 20.0
    """Strength kappa of the content prior on the item table, in clients. After each server round the
    server moves item i's row of the global item table a share kappa / (kappa + t_i) of the way to its
    content vector, t_i being how many participants trained that row in the round (its positives and
    sampled negatives). The content vector is the group-size-weighted mean over the groups of the fused
    Q_g(i) from content alone (the fusion model without the item-ID view). An item that many clients
    train keeps its collaborative row; one that few train leans on its content: the posterior mean
    under a Gaussian prior centred on the content vector, as in collaborative topic regression. Every
    client's item vectors carry the fusion's content knowledge from the next round on. 0: the paper's
    GFMFR, whose clients see content only through the distilled preferences."""


@dataclass(frozen=True)
class MultimodalConfig:
    """The content baselines MM-X (``wrapper = "mmx"``) and FedVLR (``wrapper = "fedvlr"``)."""

    modalities: tuple[Literal["text", "image"], ...] = ("text", "image")
    """Content modalities used (any non-empty subset of those the dataset has)."""
    content_dim: int | None = 64
    """PCA of each modality's frozen features to this many dimensions (None: keep all)."""
    content_lr: float = 0.01
    """SGD learning rate of the shared content projections and fusion layers (0.3 diverges FCF on ML-100K)."""
    router_lr: float = 0.1
    """SGD learning rate of FedVLR's private per-client router."""
    views: tuple[Literal["sum", "mlp", "gate", "attention", "mixture"], ...] = ("sum", "mlp", "gate")
    """FedVLR's server-side fusion views, mixed per user by the router."""


@dataclass(frozen=True)
class CentralisedConfig:
    """The centralised upper bound (``training = "centralised"``): one model on all training data."""

    epochs: int = 1000
    """Most passes over all training pairs (each with freshly sampled negatives); early stopping
    (``patience``) ends runs first."""
    patience: int = 20
    """Stop at a validation this many epochs after the best one (0: never stop early). An epoch
    takes Adam steps over every pair, where a federated round averages each row's local updates, so
    the bound peaks in fewer passes than a federation in rounds, and when depends on the data: at
    epoch 8 on ML-100K, after 60-100 on KU, whose 3,076 pairs make three minibatches an epoch."""
    batch_size: int = 1024
    """Training pairs per minibatch, mixed across users."""
    lr: float = 0.003
    """Adam learning rate (sparse Adam for per-user and per-item rows)."""


@dataclass(frozen=True)
class RuntimeConfig:
    """How the process runs, not what it computes (left out of :func:`bearing_dict`)."""

    client_chunk: int = 1024
    """Clients trained together in one batched pass; bounds memory on large federations."""
    client_block: int = 256
    """Clients per autograd block within one local step; bounds the step's working memory."""
    prefetch: bool = True
    """Build the next chunk's examples and minibatch schedule (NumPy: negative sampling, shuffles)
    in a background thread while this chunk trains; the data is the same either way."""
    eval_batch: int = 256
    """Users scored at once during evaluation; bounds its memory (users x items scores)."""
    hold_mb: int = 4096
    """MB of uploads GFMFR's server round holds in memory while it waits for every participant's head
    to group them; beyond, they wait in temporary safetensors files, read back one chunk at a time
    (a round of a million participants uploads about 38 GB of item rows). The same numbers either way."""

    checkpoint_every: int = 1
    """With ``--out``, write a checkpoint (``OUT/checkpoint.safetensors``) every N rounds, so that
    ``--resume`` continues a killed run (0: none); removed once the run has finished. Checkpoints
    take at most a tenth of a run's time: where one takes longer to write (FedRAP's dense private
    tables), they are written less often."""
    save_model: bool = True
    """With ``--out``, save the federation at each new best validation round in ``OUT/model/``, for
    ``gfmfr recommend`` (FedRAP's is 395 MB on ML-100K: a large ``gfmfr compare`` plan may turn it off)."""
    backend: Literal["in-process", "flower"] = "in-process"
    """``in-process``: the batched engine in this process; ``flower``: Flower's simulation engine, one
    ClientApp per node, each hosting a partition of the users (the same numbers)."""
    stall_timeout: float = 1800.0
    """Seconds a Flower run may go without progress (a round's step, a node's reply) before it ends with
    an error instead of waiting for ever (0: never)."""
    nodes: int = 2
    """Simulated Flower nodes (``backend = "flower"``); the users are split into this many partitions."""

    threads: int = 0
    """Torch intra-op threads (0: one per core). With OpenMP's passive wait (set on import), one per
    core keeps a quiet machine's speed and loses at most about a third when another job holds a core
    (``benchmarks/threads.py``); parallel sweeps should give each run 1."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run; ``seed`` makes it reproducible."""

    seed: int = 0
    """Seed of every random choice: initialisation, sampling, shuffling."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data section."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model section."""
    federation: FederationConfig = field(default_factory=FederationConfig)
    """Federation section."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation section."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Differential privacy and signature noise section."""
    training: Literal["federated", "centralised"] = "federated"
    """``federated``, or ``centralised``: the same model trained on all data in one place (the upper bound)."""
    wrapper: Literal["none", "mmx", "fedvlr"] = "none"
    """Model wrapper that adds item content to the base model X: ``mmx`` (MM-X) or ``fedvlr`` (FedVLR-X)."""
    plugin: Literal["none", "gfmfr"] = "none"
    """Plug-in on the federation: ``gfmfr`` (a server half that ships hints, a client half that adds a loss term)."""
    gfmfr: GFMFRConfig = field(default_factory=GFMFRConfig)
    """GFMFR plug-in section."""
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)
    """MM-X and FedVLR section."""
    centralised: CentralisedConfig = field(default_factory=CentralisedConfig)
    """Centralised upper-bound section."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Engine internals: threads, client chunks and blocks, prefetching, evaluation batch."""


SCORE_BASELINES = ("popularity", "content-knn", "random")
"""Models that score without training (:mod:`gfmfr.models.baselines`)."""
