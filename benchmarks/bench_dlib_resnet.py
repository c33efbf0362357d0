"""dlib's ResNet face recogniser: faces/s of tidyface's `dlib_resnet` against dlib itself
(dlib-bin), on the same 150x150 chips, at batch 1 and 64, CPU.

    python benchmarks/bench_dlib_resnet.py [--threads 2] [--rounds 3]

dlib: `face_recognition_model_v1.compute_face_descriptor` on a list of aligned chips (dlib runs
them in mini-batches of 16, its own choice); tidyface: `descriptors` (dlib's raw 128-d) as
loaded, and `tasks.pipeline.encode` on the ModelCache's model (channels-last; L2-normalised), as
the tasks run it. The chips are dlib's own (dlib.get_face_chip on dlib's 5 points) of the
deepface photos. Thread counts: torch.set_num_threads, and OMP / OpenBLAS variables set before
dlib loads (dlib-bin's CPU build may or may not use them).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from _paths import SHARED


def per_second(fn, batch, rounds):
    fn(batch)  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t)
    return len(batch) / statistics.median(times)


def dlib_chips(dlib, paths, count):
    """dlib's chips of the first face dlib finds in each photo, repeated up to `count`."""
    from tidyface import registry
    from tidyface.ops.image import read_image
    from tidyface.weights import resolve_file

    spec = registry.get("dlib5").spec
    predictor = dlib.shape_predictor(str(resolve_file(spec.files[0], spec)))
    detector = dlib.get_frontal_face_detector()
    chips = []
    for path in paths:
        image = read_image(path)
        faces = detector(image, 0)
        if faces:
            chips.append(dlib.get_face_chip(image, predictor(image, faces[0])))
        if len(chips) == 8:
            break
    return [chips[i % len(chips)] for i in range(count)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import dlib
    import torch

    from tidyface import registry
    from tidyface.cache import ModelCache
    from tidyface.tasks.pipeline import encode
    from tidyface.weights import load_model, resolve_file

    torch.set_num_threads(args.threads)
    spec = registry.get("dlib_resnet").spec
    reference = dlib.face_recognition_model_v1(str(resolve_file(spec.files[0], spec)))
    chips = dlib_chips(dlib, sorted((SHARED / "media/deepface_pairs").glob("img*.jpg")), 64)
    loaded, ready = load_model("dlib_resnet"), ModelCache().get("dlib_resnet", "cpu")
    rows = []
    for batch in (1, 64):
        numpy_batch = chips[:batch]
        tensor_batch = torch.from_numpy(np.stack(numpy_batch)).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            rows.append((batch, per_second(lambda b: reference.compute_face_descriptor(b), numpy_batch, args.rounds),
                         per_second(loaded.descriptors, tensor_batch, args.rounds),
                         per_second(lambda b: encode(ready, b, 64), tensor_batch, args.rounds)))
    print(f"\nCPU, {args.threads} threads, median of {args.rounds} rounds, faces/s")
    print("| batch | dlib (dlib-bin) | tidyface descriptors, as loaded | tidyface encode (tasks) |")
    print("|---|---|---|---|")
    for batch, ref, ours, tasks in rows:
        print(f"| {batch} | {ref:.1f} | {ours:.1f} | {tasks:.1f} |")


if __name__ == "__main__":
    main()
