"""video2faces --engine local against --engine ray on this machine: N copies of Video_2.mp4.

    python benchmarks/bench_ray.py [--copies 6] [--step 1] [--workers 2] [--reader opencv]

The copies are symbolic links in a temporary folder. Both runs take the same flags and write
byte-identical results (checked here); the weights are loaded and converted before timing (the
local run takes them from the process's ModelCache; each Ray worker loads its own, which is part
of Ray's cost). Printed: wall times, the Ray cluster's start, a no-op task's round trip, Ray's
overhead per video, and the per-frame and per-face costs that the projection in the report uses:
the decode floor (just reading the sampled frames, same reader), detection + embedding per
sampled frame, and the grouping stage alone (--mode grouping over the local run's faces).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _paths import VIDEO


def read_floor(step: float, reader: str) -> tuple[int, float]:
    from tidyface.ops.video import VideoReader

    t = time.perf_counter()
    with VideoReader(VIDEO, step=step, reader=reader, threads=1) as r:
        n = sum(1 for _ in r)
    return n, time.perf_counter() - t


def unit_seconds(out: Path) -> list[float]:
    m = json.loads((out / ".tidyface/manifest.json").read_text())
    return [v["seconds"] for v in m["videos"].values()]


def ray_costs(ray) -> tuple[float, float]:
    """(seconds to start a 2-CPU local cluster, mean round trip of a no-op task)."""
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    start = time.perf_counter() - t
    noop = ray.remote(lambda: None)
    ray.get([noop.remote() for _ in range(10)])  # its worker processes up
    t = time.perf_counter()
    for _ in range(50):
        ray.get(noop.remote())
    return start, (time.perf_counter() - t) / 50


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--step", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reader", default="opencv")
    args = ap.parse_args()
    import ray

    from tidyface.cache import default_cache
    from tidyface.options import Video2FacesOptions
    from tidyface.tasks.video2faces import video_to_faces

    o = Video2FacesOptions(input=str(VIDEO))  # the models a plain run picks
    for m in (o.det_model, o.enc_model):
        default_cache().get(m, "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    src = tmp / "in"
    src.mkdir()
    for i in range(args.copies):
        (src / f"copy{i}.mp4").symlink_to(VIDEO)
    flags = dict(video_step=args.step, video_reader=args.reader)
    frames, floor = read_floor(args.step, args.reader)
    t = time.perf_counter()
    local = video_to_faces(str(src), out_dir=str(tmp / "local"), **flags)
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    video_to_faces(str(src), out_dir=str(tmp / "local"), mode="grouping")
    t_group = time.perf_counter() - t
    start, trip = ray_costs(ray)
    t = time.perf_counter()
    remote = video_to_faces(str(src), out_dir=str(tmp / "ray"), engine="ray", workers=args.workers, **flags)
    t_ray = time.perf_counter() - t
    ray.shutdown()
    same = (tmp / "local/groups.csv").read_bytes() == (tmp / "ray/groups.csv").read_bytes() and \
        {k: v for k, v in remote.items() if k not in ("seconds", "out")} == \
        {k: v for k, v in local.items() if k not in ("seconds", "out")}
    busy_local, busy_ray = sum(unit_seconds(tmp / "local")), sum(unit_seconds(tmp / "ray"))
    n, faces = args.copies, local["faces"]
    print(f"{n} copies of {VIDEO.name}, step {args.step} s, reader {args.reader}, "
          f"torch threads in this process {torch.get_num_threads()}")
    print(f"decode floor (read {frames} sampled frames, 1 thread): {floor:.2f} s = "
          f"{1000 * floor / frames:.1f} ms/frame")
    print(f"local: {t_local:.1f} s wall ({t_local / n:.2f} s/video); detection stage {busy_local:.1f} s "
          f"= {1000 * busy_local / local['frames']:.1f} ms per sampled frame, {local['frames']} frames, "
          f"{faces} faces saved ({faces - local['duplicates']} left after dedup)")
    print(f"grouping stage alone (--mode grouping, {faces} faces): {t_group:.2f} s")
    print(f"ray: cluster start {start:.1f} s (not in the run's time), no-op task round trip {1000 * trip:.2f} ms")
    print(f"ray ({args.workers} workers x 1 CPU): {t_ray:.1f} s wall ({t_ray / n:.2f} s/video), of which the "
          f"driver's grouping ~{t_group:.1f} s; workers busy {busy_ray:.1f} s in detect_unit, "
          f"{args.workers * (t_ray - t_group) - busy_ray:.1f} worker-s outside it (start, model loads, "
          f"dispatch, the tail) = {(args.workers * (t_ray - t_group) - busy_ray) / n:.2f} s per video; "
          f"(ray - local wall) / videos {(t_ray - t_local) / n:+.2f} s; groups.csv and summary identical: {same}")
    print(f"speed-up local/ray: {t_local / t_ray:.2f}x; outputs in {tmp}")


if __name__ == "__main__":
    main()
