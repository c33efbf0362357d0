"""Auto grouping cut at fixed thresholds, on the labelled faces of Video_2.mp4.

    python benchmarks/eval_auto_threshold.py --enc-model mobilefacenet --thresholds 0.5,0.55,0.6,0.65,0.7,0.75

Auto grouping chooses its cut from the data now (grouping.choose_cut; every candidate on every
labelled set: eval_auto_grouping.py). A fixed cut is what `--auto-thr` asks for, and the
encoder's `spec.defaults.group_threshold` is the cut where none can be chosen (2 faces); this
script scores such cuts. It runs video2faces' detection stage once (defaults otherwise), then
auto grouping at each threshold over all faces (no dedup), and scores it on
tests/data/video2_faces_truth.csv: groups, purity, faces left unassigned, and the adjusted Rand
index (unassigned faces counted as singletons). The encoder's default is printed with the table.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from _paths import ROOT, VIDEO


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--enc-model", default="mobilefacenet")
    ap.add_argument("--thresholds", default="0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.75")
    args = ap.parse_args()
    from tidyface.cache import default_cache
    from tidyface.ops.nms import box_iou
    from tidyface.tasks import grouping as gp
    from tidyface.tasks.video2faces import Workspace, embed_missing, video_to_faces
    from tidyface.types import FaceTable

    models = default_cache()
    encoder = models.get(args.enc_model, "cpu")
    with tempfile.TemporaryDirectory() as out:
        video_to_faces(str(VIDEO), models, out_dir=out, mode="detection", enc_model=args.enc_model)
        ws = Workspace(Path(out))
        table = FaceTable.load(ws.table_path("01"))
        # Detection defers the embeddings of faces it may drop as duplicates (NaN): embed them all.
        n = len(table)
        embed_missing(table, np.ones(n, bool), np.zeros(n, np.int64), [ws.crops_path("01")], encoder, 16)
    truth = list(csv.DictReader(l for l in open(ROOT / "tests/data/video2_faces_truth.csv") if not l.startswith("#")))
    label = {}
    for t in truth:
        sel = np.flatnonzero(table.frame == int(t["frame"]))
        if len(sel):
            iou = box_iou(torch.tensor([[float(t[k]) for k in ("x1", "y1", "x2", "y2")]]),
                          torch.from_numpy(table.boxes[sel]))[0]
            if iou.max() >= 0.5 and t["person"] != "none":
                label[int(sel[int(iou.argmax())])] = t["person"]
    idx = np.array(sorted(label))
    truth_l = [label[i] for i in idx]
    print(f"{args.enc_model}: {n} faces, {len(idx)} labelled; "
          f"default threshold {encoder.spec.defaults.group_threshold}")
    print("| threshold | groups | unassigned | labelled purity | labelled unassigned | ARI |\n|---|---|---|---|---|---|")
    for thr in (float(x) for x in args.thresholds.split(",")):
        labels = np.array(gp.auto(torch.from_numpy(table.embeddings), thr).labels)
        pred = labels[idx]
        groups = set(pred) - {"unassigned"}
        major = {g: Counter(t for t, p in zip(truth_l, pred) if p == g).most_common(1)[0][0] for g in groups}
        pure = sum(major.get(p) == t for t, p in zip(truth_l, pred) if p != "unassigned")
        assigned = int((pred != "unassigned").sum())
        ari = adjusted_rand_score(truth_l, [p if p != "unassigned" else f"u{i}" for i, p in enumerate(pred)])
        print(f"| {thr} | {len(set(labels) - {'unassigned'})} | {int((labels == 'unassigned').sum())} | "
              f"{pure}/{assigned} | {len(pred) - assigned} | {ari:.3f} |")


if __name__ == "__main__":
    main()
