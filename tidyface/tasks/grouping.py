"""Grouping faces by identity from L2-normalised embeddings (N,D): three modes, one result type.

- cluster: KMeans for each k of a range, k chosen by the cosine silhouette.
- auto: no k, no threshold; average-linkage agglomerative clustering on cosine distance, the
  tree cut at the height the silhouette of its groups chooses (or at a given threshold).
  Faces that end alone are "unassigned".
- classify: nearest class by the minimum cosine distance to each class's reference embeddings,
  with an optional "other" threshold.

Every mode returns `Grouping`: one group name per face, the distance behind each decision, and
the run's details (silhouette per k, per-class distances) for the grouping log.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .dedup import DEFAULT_BLOCK, EMBEDDING_EPS, _unit_rows, close_pair_components

# auto mode's cut where the data cannot choose one (2 faces, or all alike) and no encoder
# default is given (cosine distance, average linkage).
AUTO_THRESHOLD = 0.4
# The cut heights (cosine distance) auto mode chooses among by the silhouette: above 1.0 two
# faces are anti-correlated on average, never one person.
AUTO_HEIGHTS = tuple(round(0.05 + 0.025 * i, 3) for i in range(39))
AUTO_SILHOUETTE_ROWS = 4000  # faces whose silhouette is averaged (a seeded sample above this)
AUTO_SAMPLE = 5000  # above AGGLOMERATIVE_MAX_N faces, the cut is chosen on a seeded sample's tree
AUTO_SHARE_POWER = 0.5  # the cut's score: silhouette of the grouped faces x (their share)^this
# Faces closer than this are copies of one picture (a burst, neighbouring video frames): each
# set of copies weighs as one face in the cut's score, so copying a picture never moves the cut.
AUTO_COPY_HEIGHT = 0.05
AUTO_TIE = 0.005  # scores within this share of the best count as tied (see _chosen_height)
# Exact agglomerative clustering holds the N(N-1)/2 float64 distances (10k faces: 400 MB, and
# scipy's linkage copies them); above this many faces `auto` first splits the set by a tiled
# threshold graph (see `auto`).
AGGLOMERATIVE_MAX_N = 10000
SILHOUETTE_SAMPLE = 10000  # silhouette is O(N^2): above this, scored on a fixed seeded sample
N_INIT = 4  # KMeans restarts per k (set explicitly: sklearn's "auto" means 1 for k-means++)
UNASSIGNED = "unassigned"
OTHER = "other"
_TILE_ELEMS = 1 << 22  # rows x columns of one similarity tile for the row-blocked helpers


@dataclass
class Grouping:
    """labels: group name per face ("0", "1", ... by decreasing size for cluster/auto,
    "unassigned", or class names / "other" for classify). distance (N,) float64: cosine
    distance to the own group's centroid (cluster/auto; for unassigned faces, to the nearest
    group's centroid, NaN when there is none) or to the chosen class's nearest reference
    (classify, also for "other"). details: what the log needs. note: a message for the caller."""

    labels: list[str]
    distance: np.ndarray
    details: dict = field(default_factory=dict)
    note: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def groups(self) -> dict[str, np.ndarray]:
        """Group name -> face indices, in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, g in enumerate(self.labels):
            out.setdefault(g, []).append(i)
        return {g: np.asarray(v, dtype=np.int64) for g, v in out.items()}


# ----------------------------------------------------------------------------- helpers

def parse_clusters(spec) -> list[int]:
    """"2-9" | "2,4,6" | "5" | "2-4,8" | int | list/tuple of those -> sorted distinct ks (>= 2)."""
    def bad(part, why):
        return ValueError(f"bad clusters spec {spec!r}: {part!r} {why}; "
                          "use a range '2-9', a list '2,4,6' or one number '5' (each k >= 2)")

    if isinstance(spec, bool):
        raise bad(spec, "is not a number")
    if isinstance(spec, (int, np.integer)):
        parts = [int(spec)]
    elif isinstance(spec, str):
        parts = spec.split(",")
    elif isinstance(spec, (list, tuple)):
        parts = list(spec)
    else:
        raise bad(spec, "is not a string, number or list")
    if not parts:
        raise bad(spec, "is empty")
    ks: set[int] = set()
    for part in parts:
        if isinstance(part, bool):
            raise bad(part, "is not a number")
        if isinstance(part, (int, np.integer)):
            lo = hi = int(part)
        elif isinstance(part, str) and (m := re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)):
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
        else:
            raise bad(part, "is neither a number nor a range a-b")
        if lo > hi:
            raise bad(part, "is a range that runs backwards")
        if lo < 2:
            raise bad(part, "asks for fewer than 2 clusters")
        ks.update(range(lo, hi + 1))
    return sorted(ks)


def _name_by_size(lab: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Integer labels (-1 = unassigned) -> names "0", "1", ... by decreasing size (ties: first
    appearance), and the renumbered integer labels."""
    new = np.full(len(lab), -1, dtype=np.int64)
    ok = lab >= 0
    if ok.any():
        ids, first, counts = np.unique(lab[ok], return_index=True, return_counts=True)
        rank = np.empty(len(ids), dtype=np.int64)
        rank[np.lexsort((first, -counts))] = np.arange(len(ids))
        new[ok] = rank[np.searchsorted(ids, lab[ok])]
    return [str(v) if v >= 0 else UNASSIGNED for v in new.tolist()], new


def _rows_per_tile(cols: int) -> int:
    return max(1, _TILE_ELEMS // max(cols, 1))


def _centroid_report(x: Tensor, lab: np.ndarray):
    """Cosine distance of every face to its group's centroid (NaN if unassigned), and the
    nearest other group (-1 if none) with its distance; row-blocked, memory ~ _TILE_ELEMS."""
    n = x.shape[0]
    g = int(lab.max()) + 1 if n and lab.max() >= 0 else 0
    own = np.full(n, np.nan)
    other = np.full(n, -1, dtype=np.int64)
    other_d = np.full(n, np.nan)
    if g == 0:
        return own, other, other_d
    lab_t = torch.from_numpy(lab).to(x.device)
    ok = lab_t >= 0
    cent = torch.zeros(g, x.shape[1], device=x.device).index_add_(0, lab_t[ok], x[ok])
    cent = cent / cent.norm(dim=1, keepdim=True).clamp_min(1e-12)
    step = _rows_per_tile(g)
    for s in range(0, n, step):
        sim = x[s:s + step] @ cent.T
        li = lab_t[s:s + step]
        has = li >= 0
        own_sim = sim.gather(1, li.clamp_min(0).unsqueeze(1)).squeeze(1)
        own[s:s + step] = np.where(has.cpu().numpy(), (1 - own_sim).double().cpu().numpy(), np.nan)
        sim.scatter_(1, li.clamp_min(0).unsqueeze(1), torch.where(has, -torch.inf, own_sim).unsqueeze(1))
        if g > 1 or not has.all():
            best, arg = sim.max(1)
            valid = torch.isfinite(best).cpu().numpy()
            other[s:s + step] = np.where(valid, arg.cpu().numpy(), -1)
            other_d[s:s + step] = np.where(valid, (1 - best).double().cpu().numpy(), np.nan)
    return own, other, other_d


def _finish_groups(x: Tensor, lab: np.ndarray, details: dict, note: str) -> Grouping:
    names, lab = _name_by_size(lab)
    own, other, other_d = _centroid_report(x, lab)
    un = lab < 0
    distance = np.where(un, other_d, own)  # unassigned: how far the nearest group was
    details["nearest_other_group"] = [str(v) if v >= 0 else "" for v in other.tolist()]
    details["nearest_other_distance"] = other_d
    details["n_groups"] = int(lab.max()) + 1 if len(lab) else 0
    return Grouping(names, distance, details, note)


def _empty(mode: str, note: str, **details) -> Grouping:
    return Grouping([], np.zeros(0), {"mode": mode, **details}, note)


# ----------------------------------------------------------------------------- cluster

def cluster(emb, clusters="2-9", random_state: int = 0, save_all: bool = False,
            n_init: int = N_INIT, silhouette_sample: int = SILHOUETTE_SAMPLE) -> Grouping:
    """KMeans for each k of `clusters` (k >= number of faces is skipped), k chosen by the
    silhouette score on cosine distance (ties: the smaller k). details: "silhouette" {k: score}
    (NaN where KMeans found fewer than 2 distinct clusters), "chosen_k", and with save_all
    "labels_per_k" {k: names}. KMeans runs in Euclidean space on the unit vectors, where
    squared distance = 2 x cosine distance, so it agrees with the cosine silhouette."""
    from sklearn import config_context
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import silhouette_score

    ks = parse_clusters(clusters)
    x = _unit_rows(emb)
    n = x.shape[0]
    details = {"mode": "cluster", "ks": ks, "silhouette": {}, "chosen_k": None, "n_init": n_init}
    if n == 0:
        return _empty("cluster", "no faces to group", ks=ks, silhouette={}, chosen_k=None)
    usable = [k for k in ks if k < n]
    notes = []
    if len(usable) < len(ks):
        notes.append(f"skipped k >= {n} faces: {[k for k in ks if k >= n]}")
    X = x.cpu().numpy()
    idx = np.arange(n)
    if n > silhouette_sample:
        idx = np.sort(np.random.default_rng(random_state).choice(n, silhouette_sample, replace=False))
        details["silhouette_sample"] = int(silhouette_sample)
    per_k: dict[int, np.ndarray] = {}
    for k in usable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than k
            lab = KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit_predict(X)
        found = len(np.unique(lab))
        in_sample = len(np.unique(lab[idx]))
        if found < k:
            notes.append(f"k={k}: only {found} distinct clusters")
        if 2 <= in_sample < len(idx):
            with config_context(working_memory=256):  # MiB per distance chunk (default 1024)
                details["silhouette"][k] = float(silhouette_score(X[idx], lab[idx], metric="cosine"))
        else:
            details["silhouette"][k] = float("nan")
        per_k[k] = lab
    scores = np.array([details["silhouette"][k] for k in usable], dtype=np.float64)
    if not usable or np.isnan(scores).all():
        why = (f"{n} face(s) is too few for any k in {ks}" if not usable
               else "the embeddings do not split (e.g. all identical)")
        details["chosen_k"] = 1
        if save_all:
            details["labels_per_k"] = {}
        notes.insert(0, f"{why}: all faces put in one group")
        return _finish_groups(x, np.zeros(n, dtype=np.int64), details, "; ".join(notes))
    best = usable[int(np.nanargmax(scores))]  # first maximum = smallest k
    details["chosen_k"] = best
    if save_all:
        details["labels_per_k"] = {k: _name_by_size(lab)[0] for k, lab in per_k.items()}
    return _finish_groups(x, per_k[best], details, "; ".join(notes))


# ----------------------------------------------------------------------------- auto

def _condensed_cosine(x: Tensor) -> np.ndarray:
    """scipy's condensed distance vector (row-major upper triangle) of 1 - cos, by row blocks of
    one matmul each: ~4x faster than scipy's pdist(metric="cosine") loop, float32 products."""
    n = x.shape[0]
    out = np.empty(n * (n - 1) // 2)
    cols = torch.arange(n, device=x.device)
    pos, step = 0, _rows_per_tile(n)
    for s in range(0, n - 1, step):
        sim = x[s:s + step] @ x[s:].T  # columns before s belong to earlier rows
        upper = cols[s:].unsqueeze(0) > cols[s:s + step].unsqueeze(1)
        seg = (1 - sim[upper]).clamp_min(0).double().cpu().numpy()  # row-major = condensed order
        out[pos:pos + len(seg)] = seg
        pos += len(seg)
    return out


def _tree(x: Tensor) -> np.ndarray:
    """scipy's average-linkage tree on cosine distance (x: at least 2 unit rows)."""
    from scipy.cluster.hierarchy import linkage

    return linkage(_condensed_cosine(x), method="average")


def _cut(tree: np.ndarray, thr: float) -> np.ndarray:
    """The tree's clusters merged below thr, labels 0..K-1."""
    from scipy.cluster.hierarchy import fcluster

    # fcluster keeps merges at height <= t; the next float below thr makes that "< thr"
    return fcluster(tree, np.nextafter(thr, -np.inf), criterion="distance").astype(np.int64) - 1


def _average_linkage(x: Tensor, thr: float) -> np.ndarray:
    """Exact average-linkage clustering on cosine distance, merging while the distance < thr:
    the same partition as sklearn AgglomerativeClustering(n_clusters=None, metric="cosine",
    linkage="average", distance_threshold=thr), which also runs scipy's linkage, but with the
    distances from one matmul per block instead of pdist. Labels 0..K-1."""
    if x.shape[0] < 2:
        return np.zeros(x.shape[0], dtype=np.int64)
    return _cut(_tree(x), thr)


def _silhouettes(x: Tensor, tree: np.ndarray, heights: Sequence[float], rows: np.ndarray,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For the tree cut at each height: the mean cosine silhouette over the faces `rows` (all
    faces: sklearn's silhouette_score(metric="cosine"), faces alone scoring 0; a seeded subset:
    its unbiased estimate, each row still scored against every face), and the share of those
    rows in groups of 2 or more. NaN where the cut leaves fewer than 2 groups or no two faces
    together. For unit vectors the mean distance to a group is 1 - x . sum / size, so one
    similarity block of rows serves every height; memory ~ _TILE_ELEMS per block. weights
    (per row): the weighted mean and share instead (the group means keep every face)."""
    n = x.shape[0]
    w_all = torch.ones(len(rows), dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    cuts = [(i, torch.from_numpy(lab).to(x.device)) for i, h in enumerate(heights)
            if 2 <= int((lab := _cut(tree, h)).max()) + 1 <= n - 1]
    sizes = [torch.bincount(lab).to(x.dtype) for _, lab in cuts]
    total, grouped = np.zeros(len(heights)), np.zeros(len(heights))
    rows_t = torch.from_numpy(rows).to(x.device)
    step = _rows_per_tile(n)
    for s in range(0, len(rows), step):
        r, w = rows_t[s:s + step], w_all[s:s + step].to(x.device)
        sim = x @ x[r].T  # faces x rows: summing whole rows per group is the fast index_add
        at = torch.arange(len(r), device=x.device)
        for (h_i, lab), size in zip(cuts, sizes):
            to_group = torch.zeros(len(size), len(r), dtype=x.dtype, device=x.device).index_add_(0, lab, sim)
            own = lab[r]
            own_n = size[own]
            a = 1 - (to_group[own, at] - 1) / (own_n - 1).clamp_min(1)  # the face itself left out
            to_group = 1 - to_group / size.unsqueeze(1)
            to_group[own, at] = torch.inf
            b = to_group.min(0).values
            sil = torch.where(own_n > 1, (b - a) / torch.maximum(a, b).clamp_min(1e-12), torch.zeros_like(a))
            total[h_i] += float((sil.double() * w).sum())
            grouped[h_i] += float(w[own_n > 1].sum())
    sil, share = np.full(len(heights), np.nan), np.full(len(heights), np.nan)
    for h_i, _ in cuts:
        sil[h_i], share[h_i] = total[h_i] / float(w_all.sum()), grouped[h_i] / float(w_all.sum())
    return sil, share


def _chosen_height(heights: Sequence[float], scores: np.ndarray) -> float | None:
    """The middle of the run of neighbouring heights around the best score that score within
    AUTO_TIE of it: a run of equal scores is one partition, and scores that close differ by a
    face or two, so the cut farthest from both edges of the run is taken. None: no valid cut."""
    if np.isnan(scores).all():
        return None
    best = int(np.nanargmax(scores))
    near = np.nan_to_num(scores, nan=-np.inf) >= scores[best] - AUTO_TIE * abs(scores[best])
    lo, hi = best, best
    while lo > 0 and near[lo - 1]:
        lo -= 1
    while hi < len(scores) - 1 and near[hi + 1]:
        hi += 1
    return float(heights[(lo + hi) // 2])


def choose_cut(x: Tensor, heights: Sequence[float] | None = None, rows: int | None = None,
               sample: int | None = None, random_state: int = 0, tree: np.ndarray | None = None
               ) -> tuple[float | None, dict]:
    """The cut height of the average-linkage tree (cosine distance) whose groups score best:
    score = S_g x f^0.5 (AUTO_SHARE_POWER), where f is the share of faces in groups of 2 or
    more and S_g their mean silhouette. S_g x f is the usual silhouette (faces alone count 0),
    which rewards pairing two strangers whenever they are nearer each other than anyone else;
    S_g alone rewards leaving faces out; the score is the geometric mean of the two
    (benchmarks/eval_auto_grouping.py compares powers 1, 0.75, 0.5, 0.25, 0). A set of copies
    (faces closer than AUTO_COPY_HEIGHT) weighs as one face in S_g and f: without that, the
    near-copies of video-like sets (consecutive frames) outscore the people they show.

    heights: the candidate cuts (default AUTO_HEIGHTS); the tree is of all faces, or of a seeded
    `sample` of them when there are more (default AUTO_SAMPLE); the silhouette is averaged over
    at most `rows` of its faces (default AUTO_SILHOUETTE_ROWS). Returns (the height, or None when
    no cut leaves 2..N-1 groups: 2 faces, all faces alike), details {"cut_score",
    "silhouette" (copy-weighted), "grouped_share"}: {height: value} each.
    """
    heights = np.asarray(AUTO_HEIGHTS if heights is None else heights, dtype=np.float64)
    rows, sample = rows or AUTO_SILHOUETTE_ROWS, sample or AUTO_SAMPLE
    rng = np.random.default_rng(random_state)
    if x.shape[0] > sample:
        x = x[torch.from_numpy(np.sort(rng.choice(x.shape[0], sample, replace=False))).to(x.device)]
        tree = None
    n = x.shape[0]
    if n < 3:
        return None, {"cut_score": {}, "silhouette": {}, "grouped_share": {}}
    tree = _tree(x) if tree is None else tree
    pick = np.arange(n) if n <= rows else np.sort(rng.choice(n, rows, replace=False))
    copies = _cut(tree, AUTO_COPY_HEIGHT)
    sil, share = _silhouettes(x, tree, heights, pick, 1.0 / np.bincount(copies)[copies[pick]])
    with np.errstate(invalid="ignore", divide="ignore"):
        score = sil * share ** (AUTO_SHARE_POWER - 1)  # = S_g x f^power
    details = {name: {float(h): float(v) for h, v in zip(heights, values)}
               for name, values in (("cut_score", score), ("silhouette", sil), ("grouped_share", share))}
    return _chosen_height(heights, score), details


def _sample_then_assign(x: Tensor, thr: float, m: int, rng: np.random.Generator) -> np.ndarray:
    """Average linkage on a random m-subset, then each other face joins the cluster with the
    smallest average distance if it is < thr (for unit vectors the average cosine distance
    to a cluster is exactly 1 - x . raw_mean, so one matmul per block); otherwise -1."""
    n = x.shape[0]
    pick = np.sort(rng.choice(n, m, replace=False))
    sub = _average_linkage(x[torch.from_numpy(pick).to(x.device)], thr)
    g = int(sub.max()) + 1
    sub_t = torch.from_numpy(sub).to(x.device)
    mean = torch.zeros(g, x.shape[1], device=x.device).index_add_(0, sub_t, x[torch.from_numpy(pick).to(x.device)])
    mean = mean / torch.bincount(sub_t, minlength=g).unsqueeze(1).to(mean.dtype)
    lab = np.full(n, -1, dtype=np.int64)
    lab[pick] = sub
    rest = np.setdiff1d(np.arange(n), pick)
    step = _rows_per_tile(g)
    for s in range(0, len(rest), step):
        r = rest[s:s + step]
        best, arg = (x[torch.from_numpy(r).to(x.device)] @ mean.T).max(1)
        lab[r] = np.where((1 - best).cpu().numpy() < thr, arg.cpu().numpy(), -1)
    return lab


def _large_cut(x: Tensor, thr: float, max_exact: int, block: int, rng: np.random.Generator,
               details: dict) -> np.ndarray:
    """The cut at thr for more than max_exact faces, memory bounded (see `auto`)."""
    n = x.shape[0]
    limit = 1.0 - (thr + EMBEDDING_EPS)  # a superset of the < thr pairs, never fewer
    comp = close_pair_components(x, lambda a, b: (a @ b.T) >= limit, block)
    ids, inv, counts = np.unique(comp, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(inv, kind="stable"), np.cumsum(counts)[:-1])
    lab = np.full(n, -1, dtype=np.int64)
    nxt, approx = 0, 0
    for idx in members:  # one iteration per component, not per face
        if len(idx) < 2:
            continue
        if len(idx) <= max_exact:
            sub = _average_linkage(x[torch.from_numpy(idx).to(x.device)], thr)
        else:
            sub = _sample_then_assign(x[torch.from_numpy(idx).to(x.device)], thr, max_exact, rng)
            approx += 1
        lab[idx] = np.where(sub >= 0, sub + nxt, -1)
        nxt += int(sub.max()) + 1
    details["components"] = int(len(ids))
    details["approximate"] = approx
    return lab


def auto(emb, threshold: float | None = None, max_exact: int = AGGLOMERATIVE_MAX_N,
         block: int = DEFAULT_BLOCK, random_state: int = 0,
         fallback_threshold: float = AUTO_THRESHOLD) -> Grouping:
    """Grouping without k or threshold: average linkage on cosine distance, the tree cut at the
    height (one of AUTO_HEIGHTS) whose groups score best (`choose_cut`: the silhouette of the
    grouped faces x the square root of their share); groups of one face are "unassigned".
    `threshold` given: the tree is cut there instead. Where no cut can be scored (2 faces; all
    faces alike), fallback_threshold is used (the encoder's spec.defaults.group_threshold when
    called through pipeline.group). details: "threshold" (the cut used), "cut" ("silhouette",
    "given" or "fallback"), and when chosen "cut_score", "silhouette", "grouped_share"
    ({height: value}).

    N <= max_exact: exact average linkage on everything (the partition of sklearn
    AgglomerativeClustering(metric="cosine", linkage="average", distance_threshold=threshold),
    computed with scipy's linkage on matmul distances, see `_average_linkage`), and the height
    chosen on that tree. N > max_exact (memory): the height is chosen on the tree of a seeded
    sample (AUTO_SAMPLE faces), then a tiled all-pairs pass links faces closer than it and
    takes connected components; average linkage never merges across such components (a merge
    below the threshold needs at least one pair below it), so clustering each component
    exactly gives the exact mode's partition at that height. A component still larger than
    max_exact is clustered on a random max_exact-face sample and the rest assigned by average
    distance (approximate; counted in details["approximate"]).
    """
    if threshold is not None and not float(threshold) >= 0:
        raise ValueError(f"auto threshold must be >= 0, got {threshold}")
    x = _unit_rows(emb)
    n = x.shape[0]
    details = {"mode": "auto", "threshold": None if threshold is None else float(threshold),
               "cut": "given" if threshold is not None else "silhouette"}
    if n == 0:
        return _empty("auto", "no faces to group", **{k: v for k, v in details.items() if k != "mode"})
    rng = np.random.default_rng(random_state)
    tree = _tree(x) if 2 <= n <= max_exact else None
    if threshold is None:
        sample = max_exact if n <= max_exact else min(AUTO_SAMPLE, max_exact)  # exact: the whole tree
        h, scores = choose_cut(x, sample=sample, random_state=random_state, tree=tree)
        details.update(scores)
        details["cut"] = "silhouette" if h is not None else "fallback"
        details["threshold"] = float(fallback_threshold) if h is None else h
    thr = details["threshold"]
    if n <= max_exact:
        details["method"] = "agglomerative"
        lab = np.zeros(n, dtype=np.int64) if tree is None else _cut(tree, thr)
    else:
        details["method"] = "threshold-graph components + agglomerative per component"
        lab = _large_cut(x, thr, max_exact, block, rng, details)
    valid = lab >= 0
    if valid.any():  # groups of one face are unassigned
        sizes = np.bincount(lab[valid])
        lab = np.where(valid & (sizes[np.where(valid, lab, 0)] > 1), lab, -1)
    note = "one face: nothing to group it with" if n == 1 else ""
    if details["cut"] == "fallback" and n > 2:  # 2 faces: plainly too few to choose from
        note = f"no cut of the {n} faces' tree could be scored (too alike); cut at {thr:g}"
    return _finish_groups(x, lab, details, note)


# ----------------------------------------------------------------------------- classify

def classify(emb, ref_emb, ref_labels: Sequence, other_threshold: float = -1) -> Grouping:
    """Nearest class by min cosine distance to that class's references (several allowed).

    other_threshold >= 0: a face whose distance to every class is >= it becomes "other".
    details: "classes" (first-appearance order of ref_labels), "class_distance" (N,C) float64,
    "nearest_class" per face (also for "other"). distance = distance to the nearest class.
    """
    if other_threshold != -1 and not other_threshold >= 0:
        raise ValueError(f"other_threshold must be -1 (off) or >= 0, got {other_threshold}")
    names = [str(v) for v in (ref_labels.tolist() if hasattr(ref_labels, "tolist") else ref_labels)]
    r = _unit_rows(ref_emb)
    if r.shape[0] == 0:
        raise ValueError("classify needs at least one reference embedding")
    if len(names) != r.shape[0]:
        raise ValueError(f"{len(names)} reference labels for {r.shape[0]} reference embeddings")
    x = _unit_rows(emb).to(r.device)
    if x.shape[1] != r.shape[1]:
        raise ValueError(f"embeddings are {x.shape[1]}-d but references are {r.shape[1]}-d")
    classes = list(dict.fromkeys(names))
    pos = {c: i for i, c in enumerate(classes)}
    ref_cls = torch.tensor([pos[c] for c in names], device=r.device)
    n, c = x.shape[0], len(classes)
    dist = torch.empty(n, c, dtype=torch.float64, device=r.device)
    step = _rows_per_tile(r.shape[0])
    for s in range(0, n, step):
        d = (1 - x[s:s + step] @ r.T).clamp_min(0)
        per = torch.full((d.shape[0], c), torch.inf, device=d.device)
        per.scatter_reduce_(1, ref_cls.expand(d.shape[0], -1), d, reduce="amin")
        dist[s:s + step] = per.double()
    best_d, best = dist.min(1) if n else (torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    nearest = [classes[i] for i in best.tolist()]
    labels = list(nearest)
    if other_threshold >= 0:
        is_other = (best_d >= other_threshold).tolist()
        labels = [OTHER if o else lab for lab, o in zip(labels, is_other)]
    details = {"mode": "classify", "classes": classes, "class_distance": dist.cpu().numpy(),
               "nearest_class": nearest, "other_threshold": other_threshold}
    return Grouping(labels, best_d.cpu().numpy(), details, "" if n else "no faces to classify")


# ----------------------------------------------------------------------------- log

def grouping_log_rows(grouping: Grouping, names: Sequence[str]) -> list[dict]:
    """One dict per face for a CSV log: the group and the distances/scores behind it."""
    if len(names) != len(grouping):
        raise ValueError(f"{len(names)} names for {len(grouping)} faces")
    d = grouping.details
    mode = d.get("mode")
    rows = []
    for i, (name, group) in enumerate(zip(names, grouping.labels)):
        row = {"name": name, "group": group, "distance": float(grouping.distance[i])}
        if mode in ("cluster", "auto"):
            row["nearest_other_group"] = d["nearest_other_group"][i]
            row["nearest_other_distance"] = float(d["nearest_other_distance"][i])
        if mode == "cluster":
            k = d["chosen_k"]
            row["k"] = k
            row["silhouette"] = d["silhouette"].get(k, float("nan"))
            for kk, labs in d.get("labels_per_k", {}).items():
                row[f"group_k{kk}"] = labs[i]
        elif mode == "auto":
            row["threshold"] = d["threshold"]
        elif mode == "classify":
            row["nearest_class"] = d["nearest_class"][i]
            for j, cls in enumerate(d["classes"]):
                row[f"distance_{cls}"] = float(d["class_distance"][i, j])
        rows.append(row)
    return rows
