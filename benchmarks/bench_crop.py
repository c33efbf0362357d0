"""Aligned 256x256 face crops per second on CPU: tidyface's batched torch warp vs OpenCV
warpAffine one face at a time.

    python benchmarks/bench_crop.py [--threads 2] [--repeat 3] [--frames 8]

Two inputs, decoded once beforehand (decoding and file writing are not timed):
- photos: shared/media/face_crop_plus_demo (8 photos, 1..28 faces, 8 sizes) + insightface t1.jpg;
- frames: 1920x1080 frames of shared/media/videos/facenet_pytorch_video.mp4 (one size: batches fill).
"Warp only" starts from detections made beforehand and times matrices + warp + uint8 crops;
"with detection" times RetinaFace (tidyface's, from the process-wide ModelCache, for both rows)
plus the crops. Detection uses the weights' default input size (`spec.defaults.max_size`, longer
side 1280: the 1920x1080 frames are shrunk for the detector, boxes still in frame pixels), as
`tidyface crop` does. Each figure is the best of --repeat runs (the machine is shared), in crops
per second.
"""
from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from _paths import SHARED

from tidyface.ops.align import template_for, umeyama  # noqa: E402
from tidyface.ops.image import read_image  # noqa: E402
from tidyface.tasks.crop import Cropper, to_uint8  # noqa: E402
from tidyface.tasks.detect import detect  # noqa: E402

SIZE = 256


def photos() -> list[np.ndarray]:
    folder = SHARED / "media" / "face_crop_plus_demo"
    paths = sorted(folder.glob("*.jpg")) + [SHARED / "media" / "insightface_wheel" / "t1.jpg"]
    return [read_image(p) for p in paths]


def frames(n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(SHARED / "media" / "videos" / "facenet_pytorch_video.mp4"))
    out, i = [], 0
    while len(out) < n:
        ok, f = cap.read()
        if not ok:
            break
        if i % 12 == 0:
            out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
        i += 1
    return out


def best_rate(fn, faces: int, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return faces / best


def tidyface_crops(cropper: Cropper, images, dets=None) -> np.ndarray:
    return to_uint8(cropper.crop(images, detections=dets).crops)


def opencv_crops(images, dets) -> list[np.ndarray]:
    """The usual loop: one similarity fit and one cv2.warpAffine per face."""
    dst = template_for(SIZE)
    out = []
    for k in range(len(dets)):
        m = umeyama(dets.landmarks[k:k + 1].double(), dst)[0].numpy()
        img = images[int(dets.image_index[k])]
        out.append(cv2.warpAffine(img, m[:2], (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--frames", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    sets = {"photos": photos(), "1080p frames": frames(args.frames)}
    print(f"torch {torch.__version__}, {args.threads} threads (torch and OpenCV), output {SIZE}x{SIZE}, "
          f"arcface template, best of {args.repeat}; machine shared with other processes\n")
    rows = []
    for name, images in sets.items():
        dets = detect(images, batch_size=8)
        n = len(dets)
        label = f"{name} ({len(images)} images, {n} faces)"
        for bs in (1, 8):
            c = Cropper(SIZE, batch_size=bs, device="cpu")
            rows.append((label, f"tidyface, batch {bs}", "warp only",
                         best_rate(lambda: tidyface_crops(c, images, dets), n, args.repeat)))
        rows.append((label, "OpenCV warpAffine per face", "warp only",
                     best_rate(lambda: opencv_crops(images, dets), n, args.repeat)))
        c = Cropper(SIZE, batch_size=8, device="cpu")
        rows.append((label, "tidyface, batch 8", "with detection",
                     best_rate(lambda: tidyface_crops(c, images), n, args.repeat)))
        rows.append((label, "RetinaFace + OpenCV per face", "with detection",
                     best_rate(lambda: opencv_crops(images, detect(images, batch_size=8)), n, args.repeat)))
        # Same pixels either way (the warp is cv2.warpAffine's INTER_LINEAR + BORDER_CONSTANT).
        ours = tidyface_crops(Cropper(SIZE, device="cpu"), images, dets)
        ref = np.stack(opencv_crops(images, dets))
        diff = float(np.abs(ours.astype(int) - ref).max())
        rows.append((label, "max |tidyface - OpenCV| (uint8)", "", diff))

    w = [max(len(str(r[i])) for r in rows) for i in range(3)]
    print(f"{'input':<{w[0]}}  {'method':<{w[1]}}  {'timed':<{w[2]}}  crops/s")
    for r in rows:
        value = f"{r[3]:8.0f}" if r[2] else f"{r[3]:8.0f} (difference)"
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {value}")


if __name__ == "__main__":
    main()
