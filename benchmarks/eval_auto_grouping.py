"""Auto grouping candidates on every identity-labelled face set, for both encoders, in one table.

    python benchmarks/eval_auto_grouping.py [--encoders mobilefacenet,facenet_casia_tf] [--tracks]

The sets and their truth are tests/test_auto_grouping.py's (that file sets ARI floors for the
chosen configuration): knn (face_recognition's knn_examples), bigbang (facebank + images),
deepface (the photos of deepface_pairs' two csv files, a person = a connected set of "Yes"
pairs), photos (the three together), crowd (photos + every face of scene and crowd photos, all
strangers), deepface 5 people (its five with the most photos, 5-8 each, years apart: the closest
here to issue 16's held-out celebrity photos), one person (deepface's first alone: ARI says
nothing there, groups per person does), and Video_2: video2 = the faces video2faces groups
(its detection stage, then its dedup), video2 no dedup = every detected face (as
eval_auto_threshold.py groups them); unlabelled faces are grouped too, not scored. Photos are
embedded full size here (the test shrinks them). Embeddings are cached under
$TIDYFACE_EVAL_CACHE (default /tmp/tidyface_eval_auto_grouping; delete it to re-embed).

Metrics on the labelled faces: ARI (unassigned faces as singletons), groups per person (people
with >= 2 faces: distinct groups their faces land in, an unassigned face counting as one),
purity (assigned faces whose group's majority person is theirs), unassigned (share of those
people's faces), strangers unassigned (share). --tracks: grouping tracks (faces of neighbouring
samples linked by box overlap, optionally embedding distance) instead of faces on Video_2.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

import _paths  # noqa: F401  (puts tests/ on sys.path, points the weights mirror at shared/weights)
from test_auto_grouping import photo_files, photo_sets, photo_table, score, video2_faces, video2_labels

CACHE = Path(os.environ.get("TIDYFACE_EVAL_CACHE", "/tmp/tidyface_eval_auto_grouping"))
ENCODERS = ("mobilefacenet", "facenet_casia_tf")


# ----------------------------------------------------------------------------- faces, cached

def photo_faces(encoder: str, models) -> dict:
    """Every face of every photo (full size), as the group command finds and embeds them."""
    path = CACHE / f"photos_{encoder}.npz"
    if not path.exists():
        files = [p for fs in photo_files().values() for p in fs]
        t = photo_table(files, models.get(encoder, "cpu"), models.get("retinaface_mnet025", "cpu"))
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(path, **t)
    z = np.load(path)
    return {k: z[k] for k in z.files}


def video_faces(encoder: str, models) -> dict:
    """Video_2's faces from video2faces' detection stage (test_auto_grouping.video2_faces)."""
    import tempfile

    path = CACHE / f"video2_{encoder}.npz"
    if not path.exists():
        with tempfile.TemporaryDirectory() as out:
            t = video2_faces(models.get(encoder, "cpu"), models, Path(out))
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(path, **t)
    z = np.load(path)
    return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- candidates

def _ints(g) -> np.ndarray:
    return np.array([-1 if v == "unassigned" else int(v) for v in g.labels], dtype=np.int64)


def _cosine(x: np.ndarray) -> np.ndarray:
    d = 1.0 - x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(d, 0)
    return np.clip((d + d.T) / 2, 0, None)


def _alone_unassigned(lab: np.ndarray) -> np.ndarray:
    lab = np.asarray(lab, dtype=np.int64)
    ok = lab >= 0
    sizes = np.bincount(lab[ok]) if ok.any() else np.zeros(0, np.int64)
    return np.where(ok & (sizes[np.where(ok, lab, 0)] > 1), lab, -1)


def silhouette_cut(x: np.ndarray, power: float = 1.0, heights=np.arange(0.05, 1.0001, 0.025)) -> np.ndarray:
    """The cut of the average-linkage tree scoring best, by sklearn's silhouette_samples (an
    implementation apart from tidyface's): score = S_g x f^power, f the share of faces in groups,
    S_g their mean silhouette (power 1: the usual mean silhouette, faces alone 0); faces alone: -1."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    from sklearn.metrics import silhouette_samples

    n = len(x)
    if n < 3:
        return np.full(n, -1)
    d = _cosine(x)
    tree = linkage(squareform(d, checks=False), "average")
    best, best_s = None, -np.inf
    for h in heights:
        lab = fcluster(tree, np.nextafter(h, 0), "distance") - 1
        if 2 <= len(np.unique(lab)) <= n - 1:
            grouped = np.bincount(lab)[lab] > 1
            sc = silhouette_samples(d, lab, metric="precomputed")[grouped].mean() * grouped.mean() ** power
            if sc > best_s + 1e-12:  # ties: the lowest height (tidyface takes the middle of a tie)
                best, best_s = lab, sc
    return np.full(n, -1) if best is None else _alone_unassigned(best)


def median_capped(x: np.ndarray, fallback: float) -> np.ndarray:
    """tidyface's choice among the cut heights below the median distance between two faces."""
    from tidyface.tasks import grouping as gp

    d = _cosine(x)
    med = np.median(d[np.triu_indices(len(x), 1)]) if len(x) > 1 else 0.0
    heights = [h for h in gp.AUTO_HEIGHTS if h < med]
    h = gp.choose_cut(torch.from_numpy(x), heights=heights)[0] if heights else None
    return _ints(gp.auto(torch.from_numpy(x), fallback if h is None else h))


def hdbscan(x: np.ndarray, mcs: int, method: str, min_samples=None) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    if len(x) <= mcs:
        return np.full(len(x), -1)
    return HDBSCAN(min_cluster_size=mcs, min_samples=min_samples, metric="precomputed",
                   cluster_selection_method=method, copy=True).fit_predict(_cosine(x))


def attach(x: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Leftover faces join the group of their nearest grouped face if it is no farther than that
    group's own spread (its largest nearest-member distance)."""
    lab = lab.copy()
    if not (lab >= 0).any():
        return lab
    d = _cosine(x)
    np.fill_diagonal(d, np.inf)
    spread = {}
    for c in np.unique(lab[lab >= 0]):
        m = np.flatnonzero(lab == c)
        spread[c] = d[np.ix_(m, m)].min(1).max()
    grouped = np.flatnonzero(lab >= 0)
    for i in np.flatnonzero(lab < 0):
        j = grouped[np.argmin(d[i, grouped])]
        if d[i, j] <= spread[lab[j]]:
            lab[i] = lab[j]
    return lab


def candidates(encoder_spec) -> dict:
    """name -> function (N,D) unit embeddings -> integer labels (-1: unassigned)."""
    from tidyface.tasks import grouping as gp

    thr = encoder_spec.defaults.group_threshold
    c = {f"fixed cut {thr} (encoder default, today)": lambda x: _ints(gp.auto(torch.from_numpy(x), thr)),
         "CHOSEN: tidyface auto (score power 0.5, copies weigh as one)": lambda x: _ints(
             gp.auto(torch.from_numpy(x), None, fallback_threshold=thr)),
         "tidyface auto, cuts capped below the median pairwise distance": lambda x: median_capped(x, thr)}
    for power in (1.0, 0.75, 0.5, 0.25, 0.0):
        name = "silhouette cut" + (" (usual mean silhouette)" if power == 1 else f", score power {power}")
        c[name] = (lambda p: lambda x: silhouette_cut(x, p))(power)
    for mcs in (2, 3):
        for method in ("eom", "leaf"):
            c[f"hdbscan mcs={mcs} {method}"] = (lambda m, k: lambda x: hdbscan(x, m, k))(mcs, method)
    c["hdbscan mcs=2 eom min_samples=1"] = lambda x: hdbscan(x, 2, "eom", 1)
    c["hdbscan mcs=2 eom + attach"] = lambda x: attach(x, hdbscan(x, 2, "eom"))
    c["hdbscan mcs=2 leaf + attach"] = lambda x: attach(x, hdbscan(x, 2, "leaf"))
    return c


# ----------------------------------------------------------------------------- tracks (video)

def video_tracks(faces: dict, iou_min: float, max_dist: float | None) -> np.ndarray:
    """Track id per face (eval only): faces of neighbouring samples linked when their boxes
    overlap (IoU >= iou_min, mutual best) and, with max_dist, their embeddings are that close."""
    from tidyface.ops.nms import box_iou

    frames = np.unique(faces["frame"])
    step = np.diff(frames).min() if len(frames) > 1 else 1
    track = np.arange(len(faces["frame"]))
    for f0, f1 in zip(frames[:-1], frames[1:]):
        if f1 - f0 > 1.5 * step:
            continue
        a, b = np.flatnonzero(faces["frame"] == f0), np.flatnonzero(faces["frame"] == f1)
        iou = box_iou(torch.from_numpy(faces["boxes"][a]), torch.from_numpy(faces["boxes"][b])).numpy()
        for i in range(len(a)):
            j = int(iou[i].argmax())
            if iou[i, j] >= iou_min and int(iou[:, j].argmax()) == i:
                dist = 1 - float(faces["embeddings"][a[i]] @ faces["embeddings"][b[j]])
                if max_dist is None or dist <= max_dist:
                    track[track == track[b[j]]] = track[a[i]]
    return np.unique(track, return_inverse=True)[1]


def group_by_tracks(x: np.ndarray, track: np.ndarray, fn) -> np.ndarray:
    """Group each track's mean embedding; a track's faces share its group; a track of several
    faces that ends alone stays a group of its own."""
    k = int(track.max()) + 1
    mean = np.zeros((k, x.shape[1]))
    np.add.at(mean, track, x)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    lab = np.asarray(fn(mean.astype(np.float32)))
    sizes = np.bincount(track, minlength=k)
    alone = (lab < 0) & (sizes > 1)
    lab = lab.copy()
    lab[alone] = lab.max(initial=-1) + 1 + np.arange(int(alone.sum()))
    return lab[track]


# ----------------------------------------------------------------------------- the run

def evaluate(encoder: str, models, wanted=None) -> list[dict]:
    spec = models.get(encoder, "cpu").spec
    video, photos = video_faces(encoder, models), photo_faces(encoder, models)
    vlab = video2_labels(video)
    vsel = np.array([i for i, t in enumerate(vlab) if t is not None])
    kept = np.flatnonzero(video["keep"])
    ksel = np.array([j for j, i in enumerate(kept) if vlab[i] is not None])
    sets = {"video2": (video["embeddings"][kept], ksel, [vlab[kept[j]] for j in ksel]),
            "video2 no dedup": (video["embeddings"], vsel, [vlab[i] for i in vsel])}
    for name, (rows, truth) in photo_sets(photos).items():
        sets[name] = (photos["embeddings"][rows], np.arange(len(rows)), truth)
    out = []
    for cand, fn in candidates(spec).items():
        if wanted and cand not in wanted:
            continue
        for name, (x, scored, truth) in sets.items():
            pred = np.asarray(fn(np.ascontiguousarray(x, dtype=np.float32)))
            out.append({"encoder": encoder, "candidate": cand, "set": name, **score(truth, pred[scored])})
    return out


def track_rows(encoder: str, models, fns: dict) -> list[dict]:
    """Video_2: grouping faces against grouping tracks (neighbouring samples linked)."""
    video = video_faces(encoder, models)
    vlab = video2_labels(video)
    sel = np.array([i for i, t in enumerate(vlab) if t is not None])
    truth = [vlab[i] for i in sel]
    x = np.ascontiguousarray(video["embeddings"], dtype=np.float32)
    thr = models.get(encoder, "cpu").spec.defaults.group_threshold
    kept = np.flatnonzero(video["keep"])
    ksel = np.array([j for j, i in enumerate(kept) if vlab[i] is not None])
    rows = []
    for cand, fn in fns.items():
        rows.append({"encoder": encoder, "candidate": cand, "set": "video2 faces after dedup", "tracks": len(kept),
                     **score([vlab[kept[j]] for j in ksel], np.asarray(fn(x[kept]))[ksel])})
        rows.append({"encoder": encoder, "candidate": cand, "set": "video2 all faces", "tracks": len(x),
                     **score(truth, np.asarray(fn(x))[sel])})
        for iou, dist in ((0.3, None), (0.5, None), (0.3, thr), (0.5, thr)):
            track = video_tracks(video, iou, dist)
            name = f"video2 tracks IoU>={iou}" + (f", distance<={thr}" if dist else "")
            rows.append({"encoder": encoder, "candidate": cand, "set": name, "tracks": int(track.max()) + 1,
                         **score(truth, group_by_tracks(x, track, fn)[sel])})
    return rows


def print_table(rows: list[dict], extra: str | None = None) -> None:
    head = ["encoder", "candidate", "set"] + ([extra] if extra else []) + [
        "faces / people / strangers", "ARI", "groups per person", "purity", "unassigned", "strangers unassigned"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["encoder"], r["candidate"], r["set"]] + ([str(r[extra])] if extra else []) + [
            f"{r['faces']} / {r['people']} / {r['strangers']}", f"{r['ari']:.3f}", f"{r['groups_per_person']:.2f}",
            f"{r['purity']:.3f}", f"{r['unassigned']:.3f}",
            "" if np.isnan(r["strangers_unassigned"]) else f"{r['strangers_unassigned']:.3f}"]
        print("| " + " | ".join(cells) + " |")


def print_summary(rows: list[dict]) -> None:
    print("\nOver every set but 'one person' (where ARI says nothing):\n\n"
          "| encoder | candidate | mean ARI | min ARI (set) | mean purity | mean groups per person |\n"
          "|---|---|---|---|---|---|")
    keys = list(dict.fromkeys((r["encoder"], r["candidate"]) for r in rows))
    for enc, cand in keys:
        rs = [r for r in rows if r["encoder"] == enc and r["candidate"] == cand and r["set"] != "one person"]
        worst = min(rs, key=lambda r: r["ari"])
        print(f"| {enc} | {cand} | {np.mean([r['ari'] for r in rs]):.3f} | {worst['ari']:.3f} ({worst['set']}) | "
              f"{np.mean([r['purity'] for r in rs]):.3f} | {np.mean([r['groups_per_person'] for r in rs]):.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoders", default=",".join(ENCODERS))
    ap.add_argument("--candidates", default="", help="names to run (comma-separated; default all)")
    ap.add_argument("--tracks", action="store_true", help="also: grouping tracks instead of faces on Video_2")
    args = ap.parse_args()
    from tidyface.cache import default_cache

    models = default_cache()
    wanted = [c for c in args.candidates.split(",") if c]
    rows = [r for enc in args.encoders.split(",") for r in evaluate(enc, models, wanted)]
    print_table(rows)
    print_summary(rows)
    if args.tracks:
        print()
        trows = []
        for enc in args.encoders.split(","):
            fns = {k: v for k, v in candidates(models.get(enc, "cpu").spec).items()
                   if k.startswith(("fixed", "CHOSEN"))}
            trows += track_rows(enc, models, fns)
        print_table(trows, extra="tracks")


if __name__ == "__main__":
    main()
