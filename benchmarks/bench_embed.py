"""Embedding throughput on CPU, batch 32: tidyface FaceNet vs facenet-pytorch's
InceptionResnetV1 (same converted weights), and MobileFaceNet.

    python benchmarks/bench_embed.py [--threads 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from _paths import SHARED


def faces_per_s(fn, x, rounds):
    with torch.inference_mode():
        fn(x)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import refshim
    refshim.install()
    from facenet_pytorch import InceptionResnetV1

    from tidyface.ops.image import read_image
    from tidyface.tasks.common import cached_model
    from tidyface.weights import load_model

    crops = sorted((SHARED / "media/facenet_pytorch/test_images_aligned").rglob("*.*"))
    imgs = [read_image(p) for p in crops]
    x160 = torch.from_numpy(np.stack([imgs[i % len(imgs)] for i in range(32)])).permute(0, 3, 1, 2).float()
    x112 = torch.nn.functional.interpolate(x160, size=(112, 112), mode="area")

    ours = load_model("facenet_casia_tf")
    ref = InceptionResnetV1(pretrained=None, classify=False).eval()
    rows = [
        ("facenet-pytorch InceptionResnetV1 (reference)", faces_per_s(lambda x: ref((x - 127.5) / 128), x160, args.rounds)),
        ("tidyface facenet_casia_tf, as loaded", faces_per_s(ours.embed, x160, args.rounds)),
        ("tidyface facenet_casia_tf, inference-ready (tasks)", faces_per_s(cached_model("facenet_casia_tf", "cpu").embed,
                                                                          x160.contiguous(memory_format=torch.channels_last), args.rounds)),
        ("tidyface mobilefacenet, as loaded", faces_per_s(load_model("mobilefacenet").embed, x112, args.rounds)),
        ("tidyface mobilefacenet, inference-ready (tasks)", faces_per_s(cached_model("mobilefacenet", "cpu").embed,
                                                                       x112.contiguous(memory_format=torch.channels_last), args.rounds)),
    ]
    print(f"\nbatch 32, CPU, torch threads {args.threads}, median of {args.rounds}")
    print("| encoder | faces/s |\n|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:.0f} |")


if __name__ == "__main__":
    main()
