"""Whole video2faces run on Video_2.mp4 against the decode floor, with the default models.

    python benchmarks/bench_video2faces.py [--threads 2] [--steps 1,0.25]

The decode floor is the time to just read the sampled frames with the same reader (measured in
the same process, right before and right after each run: the mean); the target is whole run
<= 2x the floor on 2 cores.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from _paths import VIDEO


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", default="1,0.25")
    ap.add_argument("--reader", default="opencv")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tidyface.ops.memory import keep_freed_memory
    from tidyface.ops.video import VideoReader

    keep_freed_memory()  # as the `tidyface` command does
    from tidyface.cache import default_cache
    from tidyface.options import Video2FacesOptions
    from tidyface.tasks.video2faces import video_to_faces

    # One-time process costs are not part of a run: loading (and at first use converting) the
    # weights into the process-wide ModelCache the run takes them from, and importing the
    # grouping libraries (scipy/sklearn, ~0.3-0.8 s).
    defaults = Video2FacesOptions.STYLE_DEFAULTS["live"]
    models = default_cache()
    for m in defaults.values():
        models.get(m, "cpu")
    import scipy.cluster.hierarchy  # noqa: F401
    import scipy.sparse.csgraph  # noqa: F401
    rows = []
    for step in (float(s) for s in args.steps.split(",")):
        def read_only():
            t = time.perf_counter()
            with VideoReader(VIDEO, step=step, reader=args.reader) as r:
                n = sum(1 for _ in r)
            return n, time.perf_counter() - t

        # The floor drifts by up to 20% between minutes on a shared machine: read it right
        # before and right after the run and use the mean.
        n, before = read_only()
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            s = video_to_faces(str(VIDEO), models, out_dir=out, video_step=step, video_reader=args.reader)
            run = time.perf_counter() - t
        _, after = read_only()
        print(f"floor before {before:.2f} s, after {after:.2f} s", file=sys.stderr)
        rows.append((step, n, (before + after) / 2, run, s["faces"], len(s["groups"])))
    print(f"\nVideo_2.mp4 1280x720, 1972 frames; reader {args.reader}; torch threads {args.threads}; "
          f"defaults {defaults}")
    print("| --video-step | sampled frames | decode floor s | whole run s | run / floor | frames/s | faces | groups |")
    print("|---|---|---|---|---|---|---|---|")
    for step, n, floor, run, faces, groups in rows:
        print(f"| {step} | {n} | {floor:.1f} | {run:.1f} | {run / floor:.2f} | {n / run:.1f} | {faces} | {groups} |")


if __name__ == "__main__":
    main()
