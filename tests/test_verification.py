"""Verification on deepface's 300 labelled pairs through the whole pipeline (detect, align, embed).

The upstream models reach ROC AUC 1.0 here, so a floor of 0.99 catches conversion, colour,
normalisation or alignment bugs.
"""
import csv

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import MEDIA, need
from tidyface.tasks.embed import embed

PAIRS = MEDIA / "deepface_pairs"


def ten_fold_accuracy(scores: np.ndarray, same: np.ndarray, folds: int = 10) -> float:
    """LFW protocol: the threshold is chosen on nine folds and scored on the tenth."""
    idx = np.arange(len(scores))
    accs = []
    for k in range(folds):
        test = idx % folds == k
        cand = np.unique(scores[~test])
        best = max(cand, key=lambda t: ((scores[~test] >= t) == same[~test]).mean())
        accs.append(((scores[test] >= best) == same[test]).mean())
    return float(np.mean(accs))


@pytest.mark.parametrize("encoder", ["facenet_casia_tf", "mobilefacenet"])
def test_pairs_auc_and_accuracy(encoder):
    rows = list(csv.DictReader(open(need(PAIRS / "master.csv"))))
    files = sorted({r["file_x"] for r in rows} | {r["file_y"] for r in rows})
    table = embed([PAIRS / f for f in files], model=encoder)
    # the largest face of each photo is its subject
    area = (table.boxes[:, 2] - table.boxes[:, 0]) * (table.boxes[:, 3] - table.boxes[:, 1])
    best = {}
    for i, src in enumerate(table.source):
        if src not in best or area[i] > area[best[src]]:
            best[src] = i
    assert len(best) == len(files), "a face in every photo"
    emb = {src.rsplit("/", 1)[-1]: table.embeddings[i] for src, i in best.items()}
    same = np.array([r["Decision"] == "Yes" for r in rows])
    scores = np.array([float(emb[r["file_x"]] @ emb[r["file_y"]]) for r in rows])
    auc, acc = roc_auc_score(same, scores), ten_fold_accuracy(scores, same)
    print(f"\n{encoder}: ROC AUC {auc:.4f}, 10-fold accuracy {acc:.4f}, mean cosine same "
          f"{scores[same].mean():.3f} / different {scores[~same].mean():.3f} ({len(rows)} pairs)")
    assert auc >= 0.99
    assert acc >= 0.97
