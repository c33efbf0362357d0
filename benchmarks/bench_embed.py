"""Embedding throughput on CPU, batch 32: tidyface FaceNet vs facenet-pytorch's
InceptionResnetV1 (same architecture; the reference's weights are left random, which does not
change its speed), and MobileFaceNet.

    python benchmarks/bench_embed.py [--threads 2] [--rounds 5]

"As loaded" is `load_model` (BatchNorm separate, channel-first) calling `embed`; "inference-ready"
is what the tasks run: the model from the ModelCache (BatchNorm folded, channels-last) through
`tidyface.tasks.pipeline.encode` (channels-last input, chunks of 32). Each encoder gets crops of
its own input size (`spec.meta.input_size`): the 160x160 aligned crops of
shared/media/facenet_pytorch, area-resized for smaller inputs.
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

    from tidyface.cache import ModelCache
    from tidyface.ops.image import read_image
    from tidyface.tasks.pipeline import encode
    from tidyface.weights import load_model

    crops = sorted((SHARED / "media/facenet_pytorch/test_images_aligned").rglob("*.*"))
    imgs = [read_image(p) for p in crops]
    x160 = torch.from_numpy(np.stack([imgs[i % len(imgs)] for i in range(32)])).permute(0, 3, 1, 2).float()
    cache = ModelCache()

    def crops_for(enc):
        w, h = enc.spec.meta.input_size
        return x160 if (w, h) == (160, 160) else torch.nn.functional.interpolate(x160, size=(h, w), mode="area")

    ref = InceptionResnetV1(pretrained=None, classify=False).eval()
    rows = [("facenet-pytorch InceptionResnetV1 (reference)",
             faces_per_s(lambda x: ref((x - 127.5) / 128), x160, args.rounds))]
    for name in ("facenet_casia_tf", "mobilefacenet"):
        loaded, ready = load_model(name), cache.get(name, "cpu")
        x = crops_for(ready)
        w, h = ready.spec.meta.input_size
        dim = ready.spec.meta.embedding_dim
        rows.append((f"tidyface {name} ({w}x{h} -> {dim}-d), as loaded", faces_per_s(loaded.embed, x, args.rounds)))
        rows.append((f"tidyface {name} ({w}x{h} -> {dim}-d), inference-ready (tasks)",
                     faces_per_s(lambda c: encode(ready, c, 32), x, args.rounds)))
    print(f"\nbatch 32, CPU, torch threads {args.threads}, median of {args.rounds}")
    print("| encoder | faces/s |\n|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:.0f} |")


if __name__ == "__main__":
    main()
