"""Anime Faster R-CNN (faster_rcnn_anime) speed on CPU: tidyface against torchvision's
fasterrcnn_resnet50_fpn carrying the same random weights (tests/test_faster_rcnn.py's mmdet
checkpoint and key map; no hysts checkpoint is on these machines, and the values do not change
the work per image).

    python benchmarks/bench_faster_rcnn.py [--frames 4] [--threads 2] [--rounds 2]

torchvision does not load beside CI's torch 2.13.0, so this runs where both do, e.g. a venv with
torch 2.14.1 + torchvision 0.29.1. Both sides take the same frames of Video_2.mp4 (1280x720 RGB
0..255) one at a time and do their whole inference: tidyface `detect` (mmdet's keep-ratio resize to
800x1333, normalise, pad 32, network, proposals, RoIAlign, box head, NMS); torchvision's model
call (its own resize to 800/1333, normalise, pad, the same network, RPN, heads, NMS) with the
test's mmdet anchors and aligned RoIAlign. ms per frame: the median over frames, the lower of
--rounds interleaved rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _paths import VIDEO


def read_frames(n: int) -> list[torch.Tensor]:
    import cv2

    cap = cv2.VideoCapture(str(VIDEO))
    frames = []
    while len(frames) < n:
        ok, f = cap.read()
        if not ok:
            break
        if int(cap.get(cv2.CAP_PROP_POS_FRAMES)) % 25 == 1:  # one a second
            frames.append(torch.from_numpy(cv2.cvtColor(f, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous())
    return frames


def models():
    from test_faster_rcnn import _torchvision_model, mmdet_checkpoint, torchvision_reference

    from tidyface.convert.mmdet import convert_mmdet
    from tidyface.models.faster_rcnn import FasterRCNN

    tv = torchvision_reference()
    mm = mmdet_checkpoint()
    ours = FasterRCNN()
    ours.load_state_dict(convert_mmdet(mm, FasterRCNN), strict=True)
    return ours.eval(), _torchvision_model(tv, mm)


def per_frame(fn, frames) -> float:
    times = []
    for f in frames:
        t = time.perf_counter()
        fn(f)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frames = read_frames(args.frames)
    ours, theirs = models()
    load = open("/proc/loadavg").read().split()[:3]
    sides = {"tidyface": lambda f: ours.detect(f[None]),
             "torchvision": lambda f: theirs([f.float() / 255])}
    best = {k: float("inf") for k in sides}
    with torch.inference_mode():
        for fn in sides.values():  # warm-up
            fn(frames[0])
        for _ in range(args.rounds):
            for name, fn in sides.items():
                best[name] = min(best[name], per_frame(fn, frames))
    load_after = open("/proc/loadavg").read().split()[:3]
    print(f"faster_rcnn_anime, {len(frames)} frames 1280x720, {args.threads} threads, load "
          f"{' '.join(load)} -> {' '.join(load_after)}: ms/frame, median over frames, best of {args.rounds} rounds")
    print("| implementation | ms/frame | speed against torchvision |")
    print("|---|---|---|")
    for name in sides:
        print(f"| {name} | {best[name]:.0f} | {best['torchvision'] / best[name]:.2f}x |")


if __name__ == "__main__":
    main()
