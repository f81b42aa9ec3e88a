"""Server-side grouping of clients by their prediction heads (docs/method.md, step 4).

Signatures are standardised per feature, optionally reduced by PCA (95% variance kept), and
clustered into G groups: spectral clustering on an RBF affinity with
gamma = 1 / (2 * median pairwise Euclidean distance^2) (seeded, unlike the reference), or
k-means. Exact spectral clustering is scikit-learn's ``SpectralClustering(affinity="precomputed",
assign_labels="cluster_qr")`` computed faster: the top eigenvectors of the normalised affinity by
Lanczos iteration on it (SciPy's ``eigsh``, largest algebraic) instead of ARPACK's shift-invert mode,
which factorises the n x n Laplacian; the labels are the same (tests/test_gfmfr.py), at a quarter of
the time for 2,928 participants (``benchmarks/roofline.py``).

Above ``gfmfr.exact_grouping_max`` participants, PCA is fitted on m seeded landmark participants
(every participant projected), and spectral clustering uses the Nystrom
approximation of the normalised affinity (Fowlkes, Belongie, Chung and Malik, "Spectral grouping
using the Nystrom method", TPAMI 2004): affinities to m seeded landmarks only, O(n m^2) time and
O(n m) memory, then k-means on the row-normalised embedding. Group ids are aligned with the
previous round's by Hungarian matching on member overlap, so group g keeps meaning the same users
across rounds. Clients not sampled keep their last group; clients never grouped have none (-1).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.linalg import qr, svd
from scipy.optimize import linear_sum_assignment
from scipy.sparse.linalg import eigsh
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, KernelPCA
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)


def prepare(
    signatures: np.ndarray, pca_variance: float | None = 0.95, fit_rows: np.ndarray | None = None
) -> np.ndarray:
    """Standardise each feature; keep the principal components explaining ``pca_variance``.

    ``fit_rows``, if given, are the rows the components are fitted on (every row is projected):
    beyond ``gfmfr.exact_grouping_max`` participants, the landmarks, which keeps the cost linear in
    participants (the SVD of 8,000 FedNCF heads, 4,353 wide, takes 80 s on one core)."""
    x = StandardScaler(copy=False).fit_transform(signatures.astype(np.float64))  # in place: one copy in all
    x = np.nan_to_num(x, copy=False)  # constant features standardise to 0/0
    if pca_variance is None or min(x.shape) <= 1:
        return x
    if fit_rows is not None:
        return PCA(n_components=pca_variance, svd_solver="full").fit(x[fit_rows]).transform(x)
    if x.shape[1] <= x.shape[0]:
        return PCA(n_components=pca_variance, svd_solver="full").fit_transform(x)
    # wider than tall (FedRAP's and FedNCF's 4,225-wide heads, 943 clients): the same components
    # from the clients' Gram matrix (linear kernel PCA), at half the cost of the SVD
    kpca = KernelPCA(kernel="linear", eigen_solver="dense").fit(x)
    variance = np.clip(kpca.eigenvalues_, 0, None)
    keep = int(np.searchsorted(np.cumsum(variance) / variance.sum(), pca_variance) + 1)
    return kpca.eigenvectors_[:, :keep] * np.sqrt(variance[:keep])


def beyond_exact(n: int, landmarks: int | None, exact_max: int | None) -> bool:
    """Whether ``n`` participants are past the exact limit (``exact_max``, else ``landmarks``), where the
    landmarks stand for them all (None landmarks: never)."""
    limit = exact_max if exact_max is not None else landmarks
    return landmarks is not None and limit is not None and n > limit


def landmark_rows(n: int, landmarks: int, seed: int) -> np.ndarray:
    """The seeded, sorted rows that stand for all ``n`` beyond ``gfmfr.exact_grouping_max`` participants."""
    return np.sort(np.random.default_rng([seed, 23]).choice(n, size=min(landmarks, n), replace=False))


def rbf_affinity(x: np.ndarray) -> np.ndarray:
    """exp(-gamma * d^2) with gamma = 1 / (2 * median pairwise distance^2).

    Distances come from one matrix product (|a|^2 + |b|^2 - 2 a.b, scikit-learn's form), several
    times faster than pairwise loops on FedRAP's and FedNCF's wide signatures. The median over pairs
    is a partial sort of the whole matrix: each pair appears twice, which leaves the median as it is,
    and the n zero self-distances sort first. The exponential is taken in place.
    """
    d = euclidean_distances(x)
    n = len(x)
    pairs = n * (n - 1)
    med = 1.0
    if pairs:
        lo, hi = n + (pairs - 1) // 2, n + pairs // 2
        ranked = np.partition(d.ravel(), [lo, hi])
        med = 0.5 * (ranked[lo] + ranked[hi])
    return rbf_in_place(d, med)


def rbf_in_place(d: np.ndarray, median: float) -> np.ndarray:
    """exp(-gamma * d^2) of the distances ``d``, overwritten, with gamma = 1 / (2 * median^2)."""
    gamma = 1.0 / (2.0 * max(median, 1e-12) ** 2)
    np.multiply(d, d, out=d)
    d *= -gamma
    return np.exp(d, out=d)


def spectral_embedding(affinity: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[n, k] spectral embedding of ``affinity`` (overwritten): the eigenvectors of the k smallest
    eigenvalues of the normalised Laplacian I - D^-1/2 A D^-1/2 (self-affinities left out of A and of
    the degrees D), divided by D^1/2 (Ng, Jordan and Weiss, NeurIPS 2001; scikit-learn's embedding).
    They are the k largest of D^-1/2 A D^-1/2, found by Lanczos iteration from a seeded start."""
    n = len(affinity)
    np.fill_diagonal(affinity, 0.0)
    root = affinity.sum(0)
    root = np.where(root == 0, 1.0, np.sqrt(root))
    affinity /= root
    affinity /= root[:, None]
    if k >= n - 1:  # Lanczos needs k < n: a dense solve, cheap at this size
        _, vectors = np.linalg.eigh(affinity)
        vectors = vectors[:, -k:]
    else:
        start = np.random.RandomState(seed).uniform(-1, 1, n)
        _, vectors = eigsh(affinity, k=k, which="LA", tol=0, v0=start)
    return vectors / root[:, None]


def cluster_qr(embedding: np.ndarray) -> np.ndarray:
    """Labels from a spectral embedding by column-pivoted QR (Damle, Minden and Ying, "Simple, direct
    and efficient multi-way spectral clustering", Information and Inference 2019): the pivots pick k
    representative rows, the embedding is rotated onto them, and each row takes its largest entry."""
    k = embedding.shape[1]
    _, _, pivots = qr(embedding.T, pivoting=True)
    u, _, vt = svd(embedding[pivots[:k]].T)
    return np.abs(embedding @ (u @ vt)).argmax(1).astype(np.int64)


def nystrom_embedding(x: np.ndarray, k: int, landmarks: int, seed: int, block: int = 32768) -> np.ndarray:
    """The top ``k`` eigenvectors [n, k] of the normalised RBF affinity D^-1/2 A D^-1/2 of the rows of
    ``x``, with A approximated from ``landmarks`` seeded rows (one-shot Nystrom, Fowlkes et al. 2004).
    The bandwidth is :func:`rbf_affinity`'s, its median taken over the pairs of landmarks (a random
    sample of all pairs; every pair when every row is a landmark).

    Every step is linear in n and its memory is the [n, m'] factor B: the affinities to the landmarks
    are formed ``block`` rows at a time, and the top left singular vectors of the normalised B come
    from the eigenvectors of its [m', m'] Gram matrix (U = B V / S) in place of an SVD of B itself."""
    picked = landmark_rows(len(x), landmarks, seed)
    between = euclidean_distances(x[picked])  # [m, m], zero diagonal
    med = 1.0
    if landmarks > 1:
        med = float(np.median(between[np.triu_indices(landmarks, 1)]))
    values, vectors = np.linalg.eigh(rbf_in_place(between, med))  # W, the landmarks' own affinity
    keep = values > 1e-10 * values.max()
    lift = vectors[:, keep] / np.sqrt(values[keep])
    b = np.empty((len(x), int(keep.sum())))
    for start in range(0, len(x), block):
        rows = slice(start, start + block)
        b[rows] = rbf_in_place(euclidean_distances(x[rows], x[picked]), med) @ lift  # A ~ B B^T
    degree = np.clip(b @ b.sum(0), 1e-12, None)
    b /= np.sqrt(degree)[:, None]
    squared, right = np.linalg.eigh(b.T @ b)  # S^2 and V of b = U S V^T, ascending
    top = np.argsort(squared)[::-1][:k]
    return (b @ right[:, top]) / np.sqrt(np.clip(squared[top], 1e-300, None))


def cluster(
    x: np.ndarray,
    n_groups: int,
    method: str,
    seed: int,
    landmarks: int | None = None,
    exact_max: int | None = None,
) -> np.ndarray:
    """Group labels 0..G-1 of the rows of ``x`` (spectral: the Nystrom approximation over ``landmarks``
    rows beyond ``exact_max`` rows, by default beyond ``landmarks``)."""
    n_groups = min(n_groups, len(x))
    if n_groups <= 1:
        return np.zeros(len(x), dtype=np.int64)
    if method == "spectral" and landmarks is not None and beyond_exact(len(x), landmarks, exact_max):
        embedding = nystrom_embedding(x, n_groups, min(landmarks, len(x)), seed)
        embedding /= np.clip(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12, None)
        return KMeans(n_clusters=n_groups, n_init=10, random_state=seed).fit_predict(embedding).astype(np.int64)
    if method == "spectral":
        return cluster_qr(spectral_embedding(rbf_affinity(x), n_groups, seed))
    if method == "kmeans":
        return KMeans(n_clusters=n_groups, n_init=10, random_state=seed).fit_predict(x).astype(np.int64)
    raise ValueError(f"gfmfr.grouping must be 'spectral' or 'kmeans', got {method!r}")


def align(previous: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Relabel ``labels`` to maximise overlap with ``previous`` (-1 = no previous group)."""
    overlap = np.zeros((n_groups, n_groups))
    known = previous >= 0
    np.add.at(overlap, (labels[known], previous[known]), 1)
    rows, cols = linear_sum_assignment(-overlap)
    mapping = np.arange(n_groups)
    mapping[rows] = cols
    return mapping[labels]


class Grouping:
    """Group id per client, updated from the signatures of each round's participants."""

    def __init__(
        self,
        n_clients: int,
        n_groups: int,
        method: str = "spectral",
        pca_variance: float | None = 0.95,
        landmarks: int | None = None,
        exact_max: int | None = None,
    ):
        self.n_groups = n_groups
        self.method = method
        self.pca_variance = pca_variance
        self.landmarks, self.exact_max = landmarks, exact_max
        """Beyond ``exact_max`` participants, PCA is fitted on ``landmarks`` of them and spectral clustering
        uses the Nystrom approximation over the same ones (None: never)."""
        self.group = np.full(n_clients, -1, dtype=np.int64)
        self.view = np.zeros((0, 2))
        """2-D PCA view [participants, 2] of the last round's standardised signatures (for plots)."""

    def uses_landmarks(self, participants: int) -> bool:
        """Whether a round of this many participants is grouped through the landmarks."""
        return beyond_exact(participants, self.landmarks, self.exact_max)

    def update(self, users: np.ndarray, signatures: np.ndarray, seed: int) -> np.ndarray:
        """Cluster the participants, align ids with the last round, store and return their labels."""
        fit_rows = None
        if self.landmarks is not None and self.uses_landmarks(len(users)):
            fit_rows = landmark_rows(len(users), self.landmarks, seed)
        x = prepare(signatures, self.pca_variance, fit_rows)
        labels = cluster(x, self.n_groups, self.method, seed, self.landmarks, self.exact_max)
        labels = align(self.group[users], labels, self.n_groups)
        self.group[users] = labels
        # PCA output is ordered by variance, so its first two columns are the 2-D PCA view
        view = x if self.pca_variance is not None else prepare(x, 0.999999)
        self.view = np.pad(view[:, :2], ((0, 0), (0, max(0, 2 - view.shape[1]))))
        return labels
