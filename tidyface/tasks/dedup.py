"""Duplicate removal over face crops: a perceptual-hash pass and an embedding pass.

Both passes build the same thing: the "is duplicate" relation (distance <= threshold), its
connected components (union-find semantics: duplicates of duplicates are one set), and in each
set the face with the best `quality` is kept. Pairwise work runs in square tiles, so memory is
bounded by the tile, never by an N x N matrix.

Thresholds: -1 disables a pass (everything kept); 0 means "identical only", which for float
embeddings allows `EMBEDDING_EPS` of float32 rounding noise.

Two rules keep different people apart (both passes, when the caller gives them):
- two faces of one picture (one video frame, or one photo: `frame_keys`) are never duplicates:
  such a pair is never a link, and a set that chains two of them together is rebuilt from its
  own links, closest first, refusing every join that would put two faces of one picture in one
  set (`join_closest_first`);
- a hash match is only a candidate: with `confirm_thr`, each hash link (window and all-pairs
  stage alike) counts only if the two faces' embeddings are within that cosine distance too.
  Only confirmed links form sets, so a chain A~B~C whose B~C link is refused leaves C out.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

HASH_SIZE = 8  # 8x8 grey pixels -> 64-bit hash
# float32 cosine distance of two unit vectors is accurate to ~1e-6 for D <= 2048; pairs closer
# than this are treated as identical, and every embedding threshold gets this slack.
EMBEDDING_EPS = 1e-5
DEFAULT_BLOCK = 2048  # tile side: a 2048x2048 float32 tile is 16 MiB
# A hash link says "same scene"; the embeddings must also say "not another person" before a
# face is dropped. The distance is each encoder's own (spec.defaults.hash_confirm, measured on
# labelled faces); an encoder without one gets the strictest measured: a refused link only keeps
# a duplicate, a wrong one loses a face.
STRICTEST_HASH_CONFIRM = 0.25
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL "L" / OpenCV RGB2GRAY
# MSB first: bit 0 of the (N,64) layout is the top-left pixel, as imagehash prints it.
_BIT_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).view(np.int64)


@dataclass
class DedupResult:
    """Outcome of a duplicate pass over N faces.

    keep (N,) bool: the faces to keep. kept_of (N,) int64: for each face, the index of the face
    kept in its duplicate set (itself when kept). distance (N,) float64: distance of each face to
    kept_of (Hamming bits for the hash pass, cosine distance for the embedding pass; 0 for kept
    faces). groups: member indices (ascending) of every duplicate set with more than one face;
    kept (G,): the kept index of each of those sets. note: a message for the caller, or "".
    """

    keep: np.ndarray
    kept_of: np.ndarray
    distance: np.ndarray
    groups: list[np.ndarray] = field(default_factory=list)
    kept: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    note: str = ""

    def __len__(self) -> int:
        return int(self.keep.shape[0])

    @property
    def dropped(self) -> np.ndarray:
        return np.flatnonzero(~self.keep)


def dedup_log_rows(result: DedupResult, names: Sequence[str]) -> list[dict]:
    """One row per dropped face (for --save-dupes logs): which kept face it duplicates, how far."""
    if len(names) != len(result):
        raise ValueError(f"{len(names)} names for {len(result)} faces")
    set_of = np.full(len(result), -1, dtype=np.int64)
    for g, members in enumerate(result.groups):
        set_of[members] = g
    return [{"name": names[i], "kept": names[result.kept_of[i]], "set": int(set_of[i]),
             "distance": float(result.distance[i])} for i in result.dropped.tolist()]


# ----------------------------------------------------------------------------- image measures

def _grey(crops: Tensor) -> Tensor:
    """(N,3,H,W) RGB uint8 (0..255) or float (0..1) -> (N,1,H,W) float32 luma on 0..255."""
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"expected crops (N,3,H,W), got {tuple(crops.shape)}")
    x = crops.float()
    if crops.dtype != torch.uint8:
        x = x * 255.0
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def average_hash(crops: Tensor, bits: bool = False) -> Tensor:
    """Classic aHash, batched: luma, area-average down to 8x8, bit = pixel > mean of the 64.

    crops (N,3,H,W) RGB, uint8 or float in 0..1 (the hash is scale-free). Returns (N,) int64
    packed hashes (MSB = top-left pixel, row-major), or (N,64) bool when bits=True. Area
    averaging is adaptive_avg_pool2d: exact block means when H, W are multiples of 8.
    """
    small = F.adaptive_avg_pool2d(_grey(crops), HASH_SIZE).flatten(1)
    b = small > small.mean(1, keepdim=True)
    if bits:
        return b
    # only the MSB weight is negative (two's complement), so the int64 sum cannot overflow
    return (b.long() * torch.from_numpy(_BIT_WEIGHTS).to(b.device)).sum(1)


def hash_bits(hashes) -> Tensor:
    """(N,) int64 packed hashes or (N,64) bool bits -> (N,64) bool."""
    h = torch.as_tensor(hashes)
    if h.ndim == 2:
        if h.shape[1] != 64:
            raise ValueError(f"hash bits must be (N,64), got {tuple(h.shape)}")
        return h.bool()
    if h.ndim != 1:
        raise ValueError(f"hashes must be (N,) int64 or (N,64) bool, got {tuple(h.shape)}")
    shifts = torch.arange(63, -1, -1, device=h.device)
    return ((h.long().unsqueeze(1) >> shifts) & 1).bool()  # arithmetic shift: sign bit -> 1


def sharpness(crops: Tensor) -> Tensor:
    """Variance of the Laplacian of the luma (0..255 scale), batched: (N,3,H,W) -> (N,) float32.

    Same as `cv2.Laplacian(grey, cv2.CV_64F).var()` (3x3 kernel, reflect-101 border); uint8
    crops are read as 0..255, float crops as 0..1. Use it (times the face area) as dedup quality.
    """
    g = _grey(crops)
    if g.shape[0] == 0 or g.shape[-1] < 2 or g.shape[-2] < 2:
        return torch.zeros(g.shape[0], device=g.device)
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=g.device)
    lap = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="reflect"), k.view(1, 1, 3, 3))
    return lap.flatten(1).var(1, unbiased=False)


# ----------------------------------------------------------------------------- components

def _merge(labels: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union the pairs (i, j) into `labels` (each entry = smallest index of its set so far).

    Vectorised union-find: the pairs are lifted to their current set labels, the small graph of
    touched labels is solved with scipy's connected components, and every label is re-pointed
    at its new root (the smallest member), which keeps the array fully path-compressed.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = labels[i], labels[j]
    diff = a != b
    if not diff.any():
        return labels
    a, b = a[diff], b[diff]
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    m = len(nodes)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (inv[:len(a)], inv[len(a):])), shape=(m, m))
    _, comp = connected_components(graph, directed=False)
    root = np.full(comp.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(root, comp, nodes)  # nodes ascending -> root = smallest label of the component
    remap = np.arange(len(labels), dtype=np.int64)
    remap[nodes] = root[comp]
    return remap[labels]


def close_pair_components(feats: Tensor, close: Callable[[Tensor, Tensor], Tensor],
                          block: int = DEFAULT_BLOCK) -> np.ndarray:
    """Connected components of the relation close(a_rows, b_rows) -> (r,c) bool, tile by tile.

    Only the upper triangle of tiles is visited. Memory is one block x block tile plus its
    close pairs as indices (at worst, every pair close: block^2 x 16 bytes, 64 MiB at 2048).
    Returns (N,) int64 set labels, each the smallest index of its set.
    """
    n = feats.shape[0]
    labels = np.arange(n, dtype=np.int64)
    block = max(1, int(block))
    for r0 in range(0, n, block):
        a = feats[r0:r0 + block]
        for c0 in range(r0, n, block):
            hit = close(a, feats[c0:c0 + block])
            if c0 == r0:
                hit = torch.triu(hit, diagonal=1)
            ij = hit.nonzero().cpu().numpy()
            if len(ij):
                labels = _merge(labels, ij[:, 0] + r0, ij[:, 1] + c0)
    return labels


def frame_keys(source: Sequence, frame: Sequence) -> np.ndarray:
    """(N,) int64, equal for faces found in one picture: one (source, frame) of a video, or one
    photo (frame -1). Faces of one picture are different people, never duplicates."""
    pictures = np.array([f"{s}\x00{int(f)}" for s, f in zip(source, frame)], dtype=object)
    if len(pictures) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(pictures, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _by_smallest(roots: np.ndarray) -> np.ndarray:
    """Set ids of any kind -> each face's set named by its smallest member (our label rule)."""
    first = np.full(int(roots.max()) + 1 if len(roots) else 0, len(roots), dtype=np.int64)
    np.minimum.at(first, roots, np.arange(len(roots)))
    return first[roots]


def join_closest_first(n: int, i: np.ndarray, j: np.ndarray, dist: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Sets of n faces from the links (i, j), joined in order of increasing `dist` (ties: input
    order); a link whose two sets already hold faces of one picture (equal `keys`) is refused.
    The closest evidence wins: of two faces of one frame, each stays with the faces nearest to
    it. Python union-find: only for the few sets that need it (see _split_conflicts)."""
    parent = list(range(n))
    pictures = {}  # root -> the keys of its set (absent: a single face, its own key)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for k in np.argsort(dist, kind="stable").tolist():
        a, b = find(int(i[k])), find(int(j[k]))
        if a == b:
            continue
        ka, kb = pictures.pop(a, {keys[a]}), pictures.pop(b, {keys[b]})
        if not ka.isdisjoint(kb):  # refused: put the sets back as they were
            pictures[a], pictures[b] = ka, kb
            continue
        if len(ka) < len(kb):
            a, b, ka, kb = b, a, kb, ka
        parent[b] = a
        pictures[a] = ka | kb
    return _by_smallest(np.array([find(x) for x in range(n)], dtype=np.int64))


def _tile_links(rows: np.ndarray, link_dist: Callable[[Tensor, Tensor], Tensor],
                block: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All links (i, j, distance) among `rows` (global indices, i before j in `rows`), tile by
    tile: link_dist(ia, ib) gets index tiles (so it can look up any per-face column) and gives
    (r,c) distances, inf where the pair is no link."""
    idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    out = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))]
    for r0 in range(0, len(idx), block):
        for c0 in range(r0, len(idx), block):
            d = link_dist(idx[r0:r0 + block], idx[c0:c0 + block])
            hit = torch.isfinite(d)
            if c0 == r0:
                hit = torch.triu(hit, diagonal=1)
            ij = hit.nonzero()
            out.append((idx.numpy()[ij[:, 0].cpu().numpy() + r0], idx.numpy()[ij[:, 1].cpu().numpy() + c0],
                        d[ij[:, 0], ij[:, 1]].double().cpu().numpy()))
    return tuple(np.concatenate(col) for col in zip(*out))


def _split_conflicts(labels: np.ndarray, keys: np.ndarray | None, link_dist: Callable[[Tensor, Tensor], Tensor],
                     rows: np.ndarray | None = None, listed=None, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """Sets holding two faces of one picture, rebuilt by join_closest_first from their links:
    the `listed` ones (i, j, distance) and those link_dist finds among the set's faces that are
    in `rows` (None: all). Sets without such a pair (nearly all) are left as they are."""
    if keys is None or len(labels) < 2:
        return labels
    order = np.lexsort((keys, labels))
    lab, key = labels[order], keys[order]
    twice = (lab[1:] == lab[:-1]) & (key[1:] == key[:-1])
    if not twice.any():
        return labels
    bad = np.unique(lab[1:][twice])
    searchable = np.ones(len(labels), dtype=bool) if rows is None else np.isin(np.arange(len(labels)), rows)
    li, lj, ld = listed if listed is not None else (np.zeros(0, np.int64),) * 2 + (np.zeros(0),)
    by_set = np.argsort(labels[li], kind="stable")  # the listed links, grouped by set
    li, lj, ld = li[by_set], lj[by_set], ld[by_set]
    set_of_link = labels[li]
    out = labels.copy()
    for b, s, e in zip(bad.tolist(), np.searchsorted(lab, bad, "left"), np.searchsorted(lab, bad, "right")):
        members = np.sort(order[s:e])
        ls, le = np.searchsorted(set_of_link, b, "left"), np.searchsorted(set_of_link, b, "right")
        ti, tj, td = _tile_links(members[searchable[members]], link_dist, block)
        i, j, d = np.concatenate([li[ls:le], ti]), np.concatenate([lj[ls:le], tj]), np.concatenate([ld[ls:le], td])
        local = join_closest_first(len(members), np.searchsorted(members, i), np.searchsorted(members, j),
                                   d, keys[members])
        out[members] = members[local]
    return out


def _finish(labels: np.ndarray, quality, dist_to: Callable[[np.ndarray, np.ndarray], np.ndarray],
            note: str = "") -> DedupResult:
    """Pick the best-quality face of each set (ties: lowest index) and measure the dropped ones."""
    n = len(labels)
    q = np.zeros(n) if quality is None else np.asarray(
        quality.detach().cpu() if isinstance(quality, Tensor) else quality, dtype=np.float64).reshape(-1)
    if len(q) != n:
        raise ValueError(f"quality has {len(q)} values for {n} faces")
    if np.isnan(q).any():
        raise ValueError("quality contains NaN")
    order = np.lexsort((np.arange(n), -q, labels))  # by set, then best quality, then index
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    best = np.empty(labels.max() + 1 if n else 0, dtype=np.int64)
    best[labels[order][first]] = order[first]
    kept_of = best[labels]
    keep = kept_of == np.arange(n)
    distance = np.zeros(n)
    drop = np.flatnonzero(~keep)
    if len(drop):
        distance[drop] = dist_to(drop, kept_of[drop])
    sizes = np.bincount(labels, minlength=len(best))
    multi = np.flatnonzero(sizes > 1)
    by_set = np.argsort(labels, kind="stable")
    bounds = np.cumsum(sizes)
    groups = [by_set[bounds[s] - sizes[s]:bounds[s]] for s in multi]
    return DedupResult(keep, kept_of, distance, groups, best[multi], note)


def _disabled(n: int, what: str) -> DedupResult:
    return DedupResult(np.ones(n, dtype=bool), np.arange(n, dtype=np.int64), np.zeros(n),
                       note=f"{what} pass disabled (threshold -1)")


def _check_threshold(thr, what: str) -> None:
    if thr != -1 and thr < 0:
        raise ValueError(f"{what} threshold must be -1 (off) or >= 0, got {thr}")


# ----------------------------------------------------------------------------- passes

def hash_confirm_threshold(encoder_spec) -> float:
    """The distance that confirms a hash link for this encoder (its spec's, else the strictest)."""
    thr = None if encoder_spec is None else encoder_spec.defaults.hash_confirm
    return STRICTEST_HASH_CONFIRM if thr is None else thr


_POPCOUNT = getattr(int, "bit_count", None) or (lambda v: bin(v).count("1"))


class HashWindow:
    """Stage 1 of `hash_duplicates`, one face at a time, so a video can run it while decoding:
    a face that stage 1 links is very likely a dropped duplicate (video2faces defers its
    embedding until the whole pass has decided)."""

    def __init__(self, thr: int, window: int = 5):
        self.thr = thr
        self.recent: deque = deque(maxlen=max(0, window))

    def link(self, i: int, h: int) -> int:
        """Face i with packed hash h (int64 or unsigned) -> the face it joins: the closest of the
        last `window` unlinked faces within thr (ties: the most recent), or -1 after recording
        it as unlinked."""
        h &= 0xFFFFFFFFFFFFFFFF  # two's complement int64 -> the same 64 bits, non-negative
        best_j, best_d = -1, self.thr
        for j, hj in self.recent:  # oldest first, so `<=` lets the most recent win ties
            d = _POPCOUNT(h ^ hj)
            if d <= best_d:
                best_j, best_d = j, d
        if best_j < 0 and self.recent.maxlen:
            self.recent.append((i, h))
        return best_j


def _window_links(packed: np.ndarray, thr: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1 over the faces in input order: (i, j) for each face i the window links to j."""
    links_i, links_j = [], []
    stage1 = HashWindow(thr, window)
    for i, h in enumerate(packed.tolist()):
        j = stage1.link(i, h)
        if j >= 0:
            links_i.append(i)
            links_j.append(j)
    return np.asarray(links_i, dtype=np.int64), np.asarray(links_j, dtype=np.int64)


def _any_close(rows: np.ndarray, close: Callable[[Tensor, Tensor], Tensor], n: int,
               block: int = DEFAULT_BLOCK) -> np.ndarray:
    """(n,) bool: the faces of `rows` that close() pairs with another face of `rows`."""
    idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    out = np.zeros(n, dtype=bool)
    for r0 in range(0, len(idx), block):
        for c0 in range(r0, len(idx), block):
            hit = close(idx[r0:r0 + block], idx[c0:c0 + block])
            if c0 == r0:
                hit = torch.triu(hit, diagonal=1)
            out[idx[r0:r0 + block].numpy()[hit.any(1).cpu().numpy()]] = True
            out[idx[c0:c0 + block].numpy()[hit.any(0).cpu().numpy()]] = True
    return out


def _hamming(packed: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    x = np.bitwise_xor(packed[i], packed[j]).view(np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1).astype(np.float64)


def _pair_cosine(x: Tensor, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine distances of the row pairs (i, j) of x (rows normalised here), in bounded gathers
    of 8192 pairs (a video's links can number in the hundred thousands)."""
    out = np.empty(len(i))
    step = 8192
    for s in range(0, len(i), step):
        a = F.normalize(x[torch.from_numpy(i[s:s + step]).to(x.device)].float(), dim=1)
        b = F.normalize(x[torch.from_numpy(j[s:s + step]).to(x.device)].float(), dim=1)
        out[s:s + step] = (1.0 - (a * b).sum(1)).clamp_min(0).double().cpu().numpy()
    return out


def _differ(keys: Tensor | None, ia: Tensor, ib: Tensor) -> Tensor | bool:
    """(r,c) bool: the pairs that are not two faces of one picture (keys None: all)."""
    if keys is None:
        return True
    return keys[ia.to(keys.device)][:, None] != keys[ib.to(keys.device)][None, :]


class _HashLinks:
    """The hash pass's link test over faces by index: Hamming <= thr, not two faces of one
    picture (keys) and, when confirming (confirm_thr != -1), cosine distance <= confirm_thr.
    Embeddings are asked for only for faces that have a hash match: `need` hands the caller's
    embeddings(needed) the faces whose deferred embedding (video2faces) must be filled. A link's
    distance (the order join_closest_first takes links in) is cosine when confirming, else bits."""

    def __init__(self, bits: Tensor, keys, thr: int, embeddings, confirm_thr: float):
        self.bits, self.thr, self.source, self.confirm_thr = bits.float(), thr, embeddings, confirm_thr
        self.keys = None if keys is None else torch.from_numpy(np.asarray(keys, dtype=np.int64)).to(bits.device)
        self.emb = None

    def need(self, needed: np.ndarray) -> None:
        if self.confirm_thr == -1 or not needed.any():
            return
        e = self.source(needed) if callable(self.source) else self.source
        self.emb = torch.as_tensor(e)
        _unit_rows(self.emb[torch.from_numpy(np.flatnonzero(needed)).to(self.emb.device)])  # NaN: a bug upstream

    def _bits_apart(self, ia: Tensor, ib: Tensor) -> Tensor:
        a, b = self.bits[ia.to(self.bits.device)], self.bits[ib.to(self.bits.device)]
        return a.sum(1, keepdim=True) + b.sum(1) - 2 * (a @ b.T)  # Hamming, exact in float32 for 64 bits

    def hashes_close(self, ia: Tensor, ib: Tensor) -> Tensor:
        return (self._bits_apart(ia, ib) <= self.thr + 0.5) & _differ(self.keys, ia, ib)

    def _test(self, ia: Tensor, ib: Tensor) -> tuple[Tensor, Tensor]:
        """(r,c) tiles: which pairs are links, and their distances."""
        bits = self._bits_apart(ia, ib)
        hit = (bits <= self.thr + 0.5) & _differ(self.keys, ia, ib)
        if self.confirm_thr == -1 or not bool(hit.any()):
            return hit, bits
        dev = self.emb.device
        a = F.normalize(self.emb[ia.to(dev)].float(), dim=1)
        b = F.normalize(self.emb[ib.to(dev)].float(), dim=1)
        sim = (a @ b.T).to(bits.device)
        return hit & (sim >= 1.0 - (self.confirm_thr + EMBEDDING_EPS)), 1.0 - sim

    def close(self, ia: Tensor, ib: Tensor) -> Tensor:
        return self._test(ia, ib)[0]

    def link_dist(self, ia: Tensor, ib: Tensor) -> Tensor:
        hit, d = self._test(ia, ib)
        return torch.where(hit, d, torch.inf)

    def confirmed(self, i: np.ndarray, j: np.ndarray, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Listed hash links (the window's) -> which of them count, and their distances."""
        ok = np.ones(len(i), dtype=bool)
        if self.keys is not None:
            k = self.keys.cpu().numpy()
            ok &= k[i] != k[j]
        if self.confirm_thr == -1 or not len(i):
            return ok, _hamming(packed, i, j)
        d = _pair_cosine(self.emb, i, j)
        return ok & (d <= self.confirm_thr + EMBEDDING_EPS), d


def hash_duplicates(hashes, quality=None, thr: int = 5, window: int = 5, block: int = DEFAULT_BLOCK, *,
                    keys=None, embeddings=None, confirm_thr: float = -1) -> DedupResult:
    """Duplicates by Hamming distance <= thr between 64-bit average hashes.

    Two stages, as in video-to-faces tools: (1) in input order, each face is compared with the
    last `window` faces that stage 1 kept (cheap; catches consecutive video frames) and, when
    one is within thr, joins it and leaves the comparison; (2) the other faces are compared all
    against all, in tiles. Sets are connected components of both stages' links; each keeps its
    best `quality` face (None: the first). Stage 1 is sequential by definition (what is kept
    depends on earlier decisions); it runs on Python ints, a few us per face (100k video-like
    hashes, both stages: ~2 s on 2 busy cores). window=0 skips stage 1. thr=-1: pass off;
    thr=0: identical hashes only.

    keys (N,) (frame_keys): faces of one picture are never linked, and no set holds two of them
    (see _split_conflicts). confirm_thr (cosine distance, -1: off; hash_confirm_threshold(spec)
    gives the encoder's measured one): a link counts only if the faces' embeddings are that close
    too; a window link refused this way sends its face to stage 2. embeddings: (N,D), or a callable
    embeddings(needed (N,) bool) -> (N,D) whose `needed` rows are filled (the others may be
    NaN): it is asked for the faces with a hash match only, in two calls.
    """
    _check_threshold(thr, "hash")
    _check_threshold(confirm_thr, "hash-confirming")
    bits = hash_bits(hashes)
    n = bits.shape[0]
    if thr == -1:
        return _disabled(n, "hash")
    if confirm_thr != -1 and embeddings is None:
        raise ValueError("confirm_thr needs the faces' embeddings")
    packed = (bits.long().cpu() * torch.from_numpy(_BIT_WEIGHTS)).sum(1).numpy()
    test = _HashLinks(bits, keys, thr, embeddings, confirm_thr)
    li, lj = _window_links(packed, thr, window)
    needed = np.zeros(n, dtype=bool)
    needed[li], needed[lj] = True, True
    test.need(needed)
    ok, ld = test.confirmed(li, lj, packed)
    li, lj, ld = li[ok], lj[ok], ld[ok]
    labels = _merge(np.arange(n, dtype=np.int64), li, lj) if len(li) else np.arange(n, dtype=np.int64)
    stage2 = np.setdiff1d(np.arange(n), li)  # the window's survivors and the faces it linked in vain
    if len(stage2) > 1:
        test.need(_any_close(stage2, test.hashes_close, n, block))
        sub = close_pair_components(torch.from_numpy(stage2), test.close, block)
        labels = _merge(labels, stage2, stage2[sub])  # lift stage-2 sets back to all faces
    labels = _split_conflicts(labels, keys, test.link_dist, stage2, (li, lj, ld), block)
    return _finish(labels, quality, lambda i, j: _hamming(packed, i, j))


def _unit_rows(emb) -> Tensor:
    x = torch.as_tensor(emb)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N,D), got {tuple(x.shape)}")
    x = x.float()
    norm = x.norm(dim=1, keepdim=True)  # (torch.isfinite(x) would cost ~1.7 copies of x)
    if not torch.isfinite(norm).all():
        raise ValueError("embeddings contain NaN or inf")
    if (norm == 0).any():
        raise ValueError("embeddings contain all-zero rows")
    if ((norm - 1).abs() < 1e-5).all():  # encoders return unit vectors: no copy needed
        return x
    return x / norm


def embedding_duplicates(emb, quality=None, thr: float = 0.05, block: int = DEFAULT_BLOCK, *,
                         keys=None) -> DedupResult:
    """Duplicates by cosine distance (1 - cos) <= thr between L2-normalised embeddings (N,D).

    Blocked all-pairs search (block x block tiles of one matmul each, only pairs under the
    threshold leave a tile), connected components, best `quality` face kept per set.
    thr=-1: pass off; thr=0: identical only (within EMBEDDING_EPS). keys (N,) (frame_keys):
    faces of one picture are never linked, and no set holds two of them (_split_conflicts).
    """
    _check_threshold(thr, "embedding")
    x = _unit_rows(emb)
    n = x.shape[0]
    if thr == -1:
        return _disabled(n, "embedding")
    limit = 1.0 - (thr + EMBEDDING_EPS)  # cos >= limit  <=>  distance <= thr + eps
    k = None if keys is None else torch.from_numpy(np.asarray(keys, dtype=np.int64)).to(x.device)

    def link_dist(ia, ib):  # index tiles, for the few sets _split_conflicts rebuilds
        ia, ib = ia.to(x.device), ib.to(x.device)
        sim = x[ia] @ x[ib].T
        return torch.where((sim >= limit) & _differ(k, ia, ib), 1.0 - sim, torch.inf)

    # The search itself ignores keys: a set that a pair of one picture joins holds that pair, so
    # _split_conflicts rebuilds it from key-respecting links, which gives the same sets as a
    # search that refused the pair (its other parts have no conflict, so they join up whole).
    labels = close_pair_components(x, lambda a, b: (a @ b.T) >= limit, block)
    labels = _split_conflicts(labels, keys, link_dist, block=block)
    return _finish(labels, quality, lambda i, j: _pair_cosine(x, i, j))
