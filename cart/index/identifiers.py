"""Semantic identifiers: the schemes that turn embeddings into codes, the collision counter, the token layout.

An identifier is a fixed-length row of codes, one per level; level l has
`level_sizes[l]` codes. CART's scheme gives (k, v1..vM, u): the K-Means cluster,
the RQ-VAE codes of the residual, and a counter that separates items whose
(k, v1..vM) collide, so L = M + 2. The ablations give rows of their own length
through the same `Codes` result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans, MiniBatchKMeans

from cart import files
from cart.devices import phase
from cart.index import rqvae
from cart.index.vocab import TokenLayout
from cart.settings import IdsConfig

FULL_KMEANS_MAX_ITEMS = 50_000


@dataclass
class Codes:
    codes: np.ndarray  # (N, L) int64, one code per level
    level_sizes: list[int]
    centroids: torch.Tensor | None = None  # (K, D) for schemes with a K-Means level
    quantizer: rqvae.RQVAE | None = None
    stats: dict = field(default_factory=dict)


def residual_means(codes: np.ndarray, layout: TokenLayout, x: np.ndarray) -> np.ndarray:
    """The identifier geometry: for each decoder token, a vector in the embedding space, (V, D). Level by
    level, a token's vector is the mean of what its items' embeddings x (N, D) keep after the levels above:
    the first level's are the mean of each first code's items (with K-Means, its centroids), the next ones
    the mean residual of each code, whatever quantiser made it. Summed along an identifier they rebuild its item's embedding
    as well as its tokens can; special tokens get zeros."""
    geometry = np.zeros((layout.vocab_size, x.shape[1]), dtype=np.float64)
    rebuilt = np.zeros_like(x, dtype=np.float64)
    tokens = layout.to_tokens(codes)
    for level in range(layout.length):
        counts = np.bincount(tokens[:, level], minlength=layout.vocab_size)
        sums = np.zeros_like(geometry)
        np.add.at(sums, tokens[:, level], x - rebuilt)
        present = counts > 0
        geometry[present] = sums[present] / counts[present, None]
        rebuilt += geometry[tokens[:, level]]
    return geometry.astype(np.float32)


def build(x: torch.Tensor, cfg: IdsConfig, seed: int, phases: dict | None = None) -> Codes:
    """Identifiers for the rows of x (N, D) under `cfg.scheme`; x may be modified in place.
    `phases` collects the wall time and peak memory of each phase."""
    scheme = {"cart": _cart, "rq": _rq, "rqkmeans": _rqkmeans, "hkmeans": _hkmeans, "atomic": _atomic}[cfg.scheme]
    return scheme(x, cfg, seed, {} if phases is None else phases)


def collision_counter(prefix: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with equal `prefix` (N, P) get 0, 1, 2, ... in ascending `order` (ties: row order).
    Also returns which rows share their prefix with another row (N,) bool."""
    _, group, size = np.unique(prefix, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    rank = np.lexsort((np.arange(len(group)), order, group))  # sorted by group, then order, then row
    sorted_group = group[rank]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    counter = np.empty(len(group), dtype=np.int64)
    counter[rank] = np.arange(len(group)) - first
    return counter, size[group] > 1


def residual_counter(prefix: np.ndarray, x: np.ndarray, codes: int, seed: int, mode: str = "auto") -> np.ndarray:
    """A last token that names what sets an item apart from the others sharing its `prefix` (N, P): each
    such item's embedding x (N, D) minus its group's mean, quantised by one K-Means shared by every group
    (so a code is the same direction of difference in every group: for flags, the region's), the members
    of a group given distinct codes 1.. by an optimal assignment to the centroids. An item alone under
    its prefix gets 0. At least as many codes as the largest group; `codes` when there are enough items.
    `mode`: `kmeans`'s."""
    _, group, size = np.unique(prefix, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    members = np.flatnonzero(size[group] > 1)
    counter = np.zeros(len(prefix), dtype=np.int64)
    if not len(members):
        return counter
    x = np.asarray(x[members], dtype=np.float64)
    means = np.zeros((len(size), x.shape[1]))
    np.add.at(means, group[members], x)
    residual = (x - means[group[members]] / size[group[members], None]).astype(np.float32)
    width = max(int(size.max()), min(codes, len(members)))
    _, centroids = kmeans(residual, width, mode, seed)
    by_group = np.argsort(group[members], kind="stable")
    for rows in np.split(by_group, np.flatnonzero(np.diff(group[members][by_group])) + 1):
        cost = (centroids ** 2).sum(1)[None] - 2 * residual[rows] @ centroids.T  # squared distance, less |r|^2
        chosen, code = linear_sum_assignment(cost)
        counter[members[rows[chosen]]] = code + 1
    return counter


def kmeans(x: np.ndarray, clusters: int, mode: str, seed: int, balance: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) and centroids (K, D): full K-Means (k-means++) for small sets, mini-batch beyond.
    balance > 0: no cluster takes more than ceil(balance * N / K) items (`balanced_labels`), and the
    centroids are the means of the items each one took."""
    if mode == "full" or (mode == "auto" and len(x) <= FULL_KMEANS_MAX_ITEMS):
        model = KMeans(n_clusters=clusters, init="k-means++", n_init=1, random_state=seed)
    else:
        model = MiniBatchKMeans(n_clusters=clusters, init="k-means++", n_init=1, random_state=seed,
                                batch_size=4096, init_size=max(3 * clusters, 3 * 4096))
    labels = model.fit_predict(x).astype(np.int64)
    centroids = model.cluster_centers_.astype(np.float32)
    if balance:
        labels = balanced_labels(x, centroids, np.full(clusters, int(np.ceil(balance * len(x) / clusters))))
        centroids = member_means(x, labels, centroids)
    return labels, centroids


def balanced_labels(x: np.ndarray, centroids: np.ndarray, capacity: np.ndarray, choices: int = 8) -> np.ndarray:
    """The nearest centroid of each row of x (N, D), with at most capacity[k] rows a centroid: rows propose
    to their nearest centroids in turn and a full centroid keeps its nearest proposers (deferred
    acceptance: no row and centroid among its `choices` nearest both prefer each other to what they hold).
    Rows refused by their `choices` nearest try again among the centroids with room left."""
    n, k = len(x), len(centroids)
    if capacity.sum() < n:
        raise ValueError(f"{k} centroids with room for {int(capacity.sum())} rows cannot take {n}")
    choices = min(choices, k)
    nearest = np.empty((n, choices), dtype=np.int64)
    distance = np.empty((n, choices), dtype=np.float32)
    squared = (centroids ** 2).sum(1)
    for start in range(0, n, 8192):
        chunk = x[start: start + 8192]
        d = squared_norms(chunk)[:, None] + squared[None] - 2 * chunk @ centroids.T  # |x - c|^2
        top = (np.argpartition(d, choices - 1, axis=1)[:, :choices] if choices < k
               else np.tile(np.arange(k), (len(d), 1)))
        top_d = np.take_along_axis(d, top, 1)
        order = np.argsort(top_d, axis=1, kind="stable")
        nearest[start: start + 8192] = np.take_along_axis(top, order, 1)
        distance[start: start + 8192] = np.take_along_axis(top_d, order, 1)
    labels = np.full(n, -1, dtype=np.int64)
    held = np.full(n, np.inf, dtype=np.float32)
    tried = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    while True:
        proposing = rows[(labels < 0) & (tried < choices)]
        if not len(proposing):
            break
        holders = rows[labels >= 0]
        candidates = np.concatenate([holders, proposing])
        target = np.concatenate([labels[holders], nearest[proposing, tried[proposing]]])
        cost = np.concatenate([held[holders], distance[proposing, tried[proposing]]])
        tried[proposing] += 1
        order = np.lexsort((candidates, cost, target))  # by centroid, then distance, then row
        target, candidates, cost = target[order], candidates[order], cost[order]
        starts = np.flatnonzero(np.r_[True, target[1:] != target[:-1]])
        rank = np.arange(len(target)) - np.repeat(starts, np.diff(np.r_[starts, len(target)]))
        keep = rank < capacity[target]
        labels[candidates] = -1
        labels[candidates[keep]], held[candidates[keep]] = target[keep], cost[keep]
    left = rows[labels < 0]
    if len(left):
        room = capacity - np.bincount(labels[labels >= 0], minlength=k)
        open_ = np.flatnonzero(room > 0)
        labels[left] = open_[balanced_labels(x[left], centroids[open_], room[open_], 4 * choices)]
    return labels


def member_means(x: np.ndarray, labels: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The mean of each label's rows of x, (K, D) float32; `fallback`'s row for a label without rows."""
    sums = torch.zeros(fallback.shape, dtype=torch.float64)
    for start in range(0, len(x), 65536):  # summed in float64, a chunk at a time
        sums.index_add_(0, torch.from_numpy(labels[start: start + 65536]),
                        torch.from_numpy(x[start: start + 65536]).double())
    counts = np.bincount(labels, minlength=len(fallback))
    means = fallback.astype(np.float32).copy()
    means[counts > 0] = (sums.numpy()[counts > 0] / counts[counts > 0, None]).astype(np.float32)
    return means


def subtract_codes(x: np.ndarray, codebook: np.ndarray, codes: np.ndarray) -> None:
    """x -= codebook[codes], in place and in chunks: a second N x D copy would double peak memory."""
    for start in range(0, len(x), 65536):
        x[start: start + 65536] -= codebook[codes[start: start + 65536]]


def squared_norms(x: np.ndarray) -> np.ndarray:
    """|x_i|^2 for each row, (N,) float64, with no N x D temporary."""
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def _train_quantizer(x: torch.Tensor, cfg: IdsConfig, seed: int, phases: dict):
    """An RQ-VAE over x, the codes (N, M) and each row's squared reconstruction error (N,)."""
    with phase(phases, "rqvae_train"):
        model = rqvae.train(x, hidden=cfg.rqvae_hidden, latent=cfg.rqvae_latent, levels=cfg.levels,
                            codebook_size=cfg.codebook_size, commitment_weight=cfg.commitment_weight,
                            dead_code=cfg.rqvae_dead_code, steps=cfg.rqvae_steps, batch_size=cfg.rqvae_batch_size, lr=cfg.rqvae_lr, seed=seed)
    with phase(phases, "rqvae_encode"):
        codes = model.encode(x)
        errors = torch.cat([(model.decode(codes[i: i + 8192]) - x[i: i + 8192]).pow(2).sum(1)
                            for i in range(0, len(x), 8192)])
    return model, codes.numpy().astype(np.int64), errors.numpy()


def _with_counter(prefix: np.ndarray, sizes: list[int], order: np.ndarray, phases: dict, cfg: IdsConfig,
                  x, seed: int, **extra) -> Codes:
    """The identifiers: `prefix` and the last token `ids.counter` asks for (ordered by `order`, or from the
    embeddings x)."""
    with phase(phases, "counter"):
        counter, shared = collision_counter(prefix, order)
        largest = int(counter.max()) + 1
        if cfg.counter == "residual":
            counter = residual_counter(prefix, np.asarray(x), cfg.codebook_size, seed, cfg.kmeans)
    codes = np.concatenate([prefix, counter[:, None]], axis=1)
    stats = {"collision_rate": float(shared.mean()), "largest_group": largest} | extra.pop("stats", {})
    return Codes(codes, sizes + [int(counter.max()) + 1], stats=stats, **extra)


def _cart(x: torch.Tensor, cfg: IdsConfig, seed: int, phases: dict) -> Codes:
    with phase(phases, "kmeans"):
        labels, centroids = kmeans(x.numpy(), cfg.clusters, cfg.kmeans, seed, cfg.balance)
        subtract_codes(x.numpy(), centroids, labels)
        centroids = torch.from_numpy(centroids)
    residual_energy = float(x.pow(2).sum(1).mean())
    model, fine, errors = _train_quantizer(x, cfg, seed, phases)
    stats = {"residual_energy": residual_energy, "reconstruction_error": float(errors.mean()),
             "relative_reconstruction_error": float(errors.mean() / max(residual_energy, 1e-12))}
    prefix = np.concatenate([labels[:, None], fine], axis=1)
    # within a collision group, the item the RQ-VAE reconstructs best gets 0
    return _with_counter(prefix, [cfg.clusters] + [cfg.codebook_size] * cfg.levels, errors, phases, cfg, x, seed,
                         centroids=centroids, quantizer=model, stats=stats)


def _rq(x: torch.Tensor, cfg: IdsConfig, seed: int, phases: dict) -> Codes:
    energy = float(x.pow(2).sum(1).mean())
    model, fine, errors = _train_quantizer(x, cfg, seed, phases)
    stats = {"reconstruction_error": float(errors.mean()), "relative_reconstruction_error": float(errors.mean() / energy)}
    return _with_counter(fine, [cfg.codebook_size] * cfg.levels, errors, phases, cfg, x, seed, quantizer=model,
                         stats=stats)


def _rqkmeans(x: torch.Tensor, cfg: IdsConfig, seed: int, phases: dict) -> Codes:
    """Residual K-Means (as GRID and OneRec build semantic ids): K-Means for the first token, then one
    K-Means of V codes a level over what the levels above leave, shared by every cluster; the counter
    orders a collision group by the distance left (the best rebuilt item gets 0). The residuals replace
    x's rows in place."""
    data = x.numpy()
    with phase(phases, "kmeans"):
        labels, centroids = kmeans(data, cfg.clusters, cfg.kmeans, seed, cfg.balance)
        subtract_codes(data, centroids, labels)
        energy = float(squared_norms(data).mean())
        levels = [labels]
        for level in range(cfg.levels):
            codes, codebook = kmeans(data, cfg.codebook_size, cfg.kmeans, (seed + 1 + level) % 2**32, cfg.balance)
            subtract_codes(data, codebook, codes)
            levels.append(codes)
    errors = squared_norms(data)
    stats = {"residual_energy": energy, "reconstruction_error": float(errors.mean()),
             "relative_reconstruction_error": float(errors.mean() / max(energy, 1e-12))}
    # the counter's residual rule reads the rows less their group's mean: the same for residuals and embeddings
    return _with_counter(np.stack(levels, axis=1), [cfg.clusters] + [cfg.codebook_size] * cfg.levels, errors,
                         phases, cfg, data, seed, centroids=torch.from_numpy(centroids), stats=stats)


def _hkmeans(x: torch.Tensor, cfg: IdsConfig, seed: int, phases: dict) -> Codes:
    """Hierarchical K-Means as in NCI/GRACE: K clusters, then V sub-clusters of each group for M levels.
    A group of at most V items gives each member its own code; deeper levels then give 0."""
    data = x.numpy()
    with phase(phases, "kmeans"):
        labels, centroids = kmeans(data, cfg.clusters, cfg.kmeans, seed, cfg.balance)
    levels = [labels]
    distance = np.linalg.norm(data - centroids[labels], axis=1)
    with phase(phases, "sub_kmeans"):
        for _ in range(cfg.levels):
            _, group = np.unique(np.stack(levels, axis=1), axis=0, return_inverse=True)
            by_group = np.argsort(group.reshape(-1), kind="stable")
            bounds = np.flatnonzero(np.diff(group.reshape(-1)[by_group])) + 1
            codes = np.zeros(len(data), dtype=np.int64)
            for members in np.split(by_group, bounds):
                if len(members) <= cfg.codebook_size:
                    codes[members] = np.arange(len(members))
                else:
                    sub_labels, sub_centroids = kmeans(data[members], cfg.codebook_size, cfg.kmeans, seed, cfg.balance)
                    codes[members] = sub_labels
                    distance[members] = np.linalg.norm(data[members] - sub_centroids[sub_labels], axis=1)
            levels.append(codes)
    return _with_counter(np.stack(levels, axis=1), [cfg.clusters] + [cfg.codebook_size] * cfg.levels, distance,
                         phases, cfg, data, seed, centroids=torch.from_numpy(centroids))


def _atomic(x: torch.Tensor, cfg: IdsConfig, seed: int, phases: dict) -> Codes:
    n = len(x)
    return Codes(np.arange(n, dtype=np.int64)[:, None], [n], stats={"collision_rate": 0.0, "largest_group": 1})


def code_new_items(x: torch.Tensor, items: torch.Tensor, codes: np.ndarray, counters: int,
                   neighbours: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Identifiers for new items x (N, D) beside a trained run's items, whose embeddings are `items` (M, D)
    (both L2-normalised) and identifiers `codes` (M, L): each new item takes the prefix (all but the
    counter) of its most similar item by cosine, and the lowest of the `counters` counter codes that no
    identifier under that prefix uses; when all are taken, the next most similar item's prefix. A prefix
    the model was trained on is one it emits; the run's frozen quantisers gave most new items a prefix no
    item had, which beam search almost never reaches (docs/add.md measures both). The counter level keeps
    its size: the model's decoder has no tokens beyond it. Returns the identifiers (N, L) and which items
    went under another prefix than their most similar item's (N,) bool."""
    taken: dict[tuple, set[int]] = {}
    for row in codes.tolist():
        taken.setdefault(tuple(row[:-1]), set()).add(row[-1])
    new = np.empty((len(x), codes.shape[1]), dtype=np.int64)
    moved = np.zeros(len(x), dtype=bool)
    for start in range(0, len(x), 1024):  # a chunk's similarities at a time: (1024, M)
        similarity = x[start: start + 1024].float() @ items.float().T
        nearest = similarity.topk(min(neighbours, len(items)), dim=1).indices.numpy()
        for i, candidates in enumerate(nearest):
            for order in (candidates, similarity[i].argsort(descending=True).numpy()):  # the rest if all are full
                prefix = next((p for p in (tuple(codes[j, :-1].tolist()) for j in order)
                               if len(taken.get(p, ())) < counters), None)
                if prefix is not None:
                    break
            else:
                raise ValueError(f"new item {start + i}: every counter of every prefix is used ({counters} a prefix)")
            free = min(set(range(counters)) - taken.setdefault(prefix, set()))
            taken[prefix].add(free)
            new[start + i] = (*prefix, free)
            moved[start + i] = prefix != tuple(codes[candidates[0], :-1].tolist())
    return new, moved


def code_stats(codes: Codes) -> dict:
    """Collision and usage statistics for ids.json."""
    first = np.bincount(codes.codes[:, 0], minlength=codes.level_sizes[0])
    used = first[first > 0]
    per_level = []
    for level, size in enumerate(codes.level_sizes):
        counts = np.bincount(codes.codes[:, level], minlength=size)
        p = counts[counts > 0] / counts.sum()
        per_level.append({"size": size, "used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
                          "entropy_bits": float(-(p * np.log2(p)).sum()), "max_entropy_bits": float(np.log2(size))})
    return {
        "items": len(codes.codes),
        "length": codes.codes.shape[1],
        "level_sizes": codes.level_sizes,
        "largest_counter": int(codes.codes[:, -1].max()) if len(codes.level_sizes) > 1 else 0,
        "first_level_group_size": {"min": int(used.min()), "median": float(np.median(used)), "max": int(used.max()),
                                   "empty": int((first == 0).sum())},
        "levels": per_level,
        **codes.stats,
    }


def plot_codes(stats: dict, codes: np.ndarray, path: Path) -> None:
    """ids.png: the first-level groups' sizes and each level's code use (`stats`: `code_stats`'s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = codes.shape[1]
    fig, axes = plt.subplots(1, levels + 1, figsize=(3.2 * (levels + 1), 3), squeeze=False)
    sizes = np.sort(np.bincount(codes[:, 0]))[::-1]
    axes[0, 0].bar(np.arange(len(sizes)), sizes, width=1.0)
    axes[0, 0].set(title="first-level group sizes", xlabel="group (sorted)", ylabel="items")
    for level in range(levels):
        counts = np.sort(np.bincount(codes[:, level], minlength=stats["levels"][level]["size"]))[::-1]
        ax = axes[0, level + 1]
        ax.bar(np.arange(len(counts)), counts, width=1.0)
        ax.set(title=f"level {level}: {stats['levels'][level]['used']}/{len(counts)} codes used",
               xlabel="code (sorted by use)", ylabel="items")
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
