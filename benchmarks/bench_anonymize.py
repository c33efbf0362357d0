"""Anonymising a video on CPU, side by side in one run: `tidyface anonymize` against deface 1.5.0
(the most used face-anonymisation tool: CenterFace boxes, blurred ellipses), each as its own
command in a fresh process on the same file, with its own defaults. Printed per tool: wall time
(start-up included) and frames/s, peak memory (the process's max RSS), and the faces that two
detectors neither tool uses (OpenCV's YuNet, insightface's SCRFD-2.5g; tests/residual.py) find in
the original and in the output, on every `--stride`-th frame.

    python benchmarks/bench_anonymize.py [--video Video_2.mp4] [--seconds S] [--threads 2] [--stride 10]
        [--tables video,photos,parse] [--tools all|tidyface|deface] [--flags="--region parse"]

deface needs scikit-image, imageio and imageio-ffmpeg (`pip install deface==1.5.0` brings them).
Also: BiSeNet parse throughput, batch 32 of real 512 px face crops, against facexlib's BiSeNet
(the same network and weights, as GFPGAN and CodeFormer run it).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _paths import ROOT, SHARED, VIDEO

# Runs a command's main() in this fresh process and prints its peak RSS (KiB on Linux) last.
RUNNER = """
import resource, sys
sys.argv = {argv!r}
try:
    {call}
except SystemExit as e:
    if e.code:
        raise
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def run_tool(call: str, argv: list[str], threads: int) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUNNER.format(argv=argv, call=call)], capture_output=True,
                       text=True, env=env)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {r.stderr[-800:]}")
    rss = [line for line in r.stdout.splitlines() if line.startswith("MAXRSS")][-1]
    return wall, int(rss.split()[1]) / 1024


def cut(video: Path, seconds: float | None, folder: Path) -> Path:
    """The first `seconds` of the video (every frame, audio kept), or the video itself."""
    if not seconds:
        return video
    from tidyface.ops.video import VideoReader
    from tidyface.ops.video_write import VideoWriter

    out = folder / video.name
    with VideoReader(video, step=1e-9, fragment=(0, seconds / 60)) as r, VideoWriter(out, video, r.info.fps) as w:
        for f in r:
            w.write(f.image, f.time_s)
    return out


def frame_count(path: Path) -> int:
    import cv2

    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n


def video_table(args) -> None:
    import residual

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = cut(Path(args.video), args.seconds, tmp)
        frames = frame_count(src)
        ours = tmp / "tidyface"
        theirs = tmp / "deface" / src.name
        theirs.parent.mkdir()
        rows = [(f"tidyface ({' '.join(args.flags) or 'defaults'})", "from tidyface.cli import main; main()",
                 ["tidyface", "anonymize", str(src), "--out", str(ours), *args.flags], ours / src.name),
                ("deface 1.5.0 (defaults)", "from deface.deface import main; main()",
                 ["deface", str(src), "-o", str(theirs)], theirs)]
        counters = {"yunet": residual.yunet_counter(), "scrfd": residual.scrfd_counter()}
        print(f"{src.name}: {frames} frames, every one anonymised; residual faces on every "
              f"{args.stride}th frame; {args.threads} threads\n")
        print("| tool | wall s | frames/s | peak RSS MiB | YuNet faces left | SCRFD faces left |")
        print("|---|---|---|---|---|---|")
        for name, call, argv, out in rows:
            if args.tools != "all" and not name.startswith(args.tools):
                continue
            wall, rss = run_tool(call, argv, args.threads)
            res = residual.residuals(src, out, counters, stride=args.stride)
            cells = [f"{m}/{n} = {m / max(n, 1):.3f}" for n, m in (res["yunet"], res["scrfd"])]
            print(f"| {name} | {wall:.1f} | {frames / wall:.2f} | {rss:.0f} | {cells[0]} | {cells[1]} |", flush=True)
        if (ours / "anonymize_log.jsonl").exists():
            print("\ntidyface log:", (ours / "anonymize_log.jsonl").read_text().strip())


def photo_table(args) -> None:
    """Every photo of ../shared/media (face-bank crops and the SimpleFR database excepted: one
    cropped face each) through both tools, residual faces summed over all of them."""
    import residual

    media = SHARED / "media"
    photos = sorted(p for p in media.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                    and "facebank" not in p.parts and "database" not in p.parts and "test_images_aligned" not in p.parts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listing = tmp / "photos.txt"
        listing.write_text("".join(f"{p}\n" for p in photos))
        ours, theirs = tmp / "tidyface", tmp / "deface"
        theirs.mkdir()
        names = [str(p.relative_to(media)).replace("/", "__") for p in photos]
        for p, n in zip(photos, names):
            (theirs / n).symlink_to(p)
        counters = {"yunet": residual.yunet_counter(), "scrfd": residual.scrfd_counter()}
        print(f"\n{len(photos)} photos of ../shared/media, {args.threads} threads\n")
        print("| tool | wall s | photos/s | peak RSS MiB | YuNet faces left | SCRFD faces left |")
        print("|---|---|---|---|---|---|")
        inputs = [str(theirs / n) for n in names]
        rows = [(f"tidyface ({' '.join(args.flags) or 'defaults'})", "from tidyface.cli import main; main()",
                 ["tidyface", "anonymize", str(listing), "--out", str(ours), *args.flags],
                 lambda p: ours / p.relative_to(Path(os.path.commonpath([str(q.parent) for q in photos])))),
                ("deface 1.5.0 (defaults)", "from deface.deface import main; main()",
                 ["deface", *inputs],
                 lambda p: theirs / (str(p.relative_to(media)).replace("/", "__").rsplit(".", 1)[0]
                                     + "_anonymized." + p.name.rsplit(".", 1)[1]))]
        for name, call, argv, out_of in rows:
            if args.tools != "all" and not name.startswith(args.tools):
                continue
            wall, rss = run_tool(call, argv, args.threads)
            total = {"yunet": [0, 0], "scrfd": [0, 0]}
            for p in photos:
                for k, (n, m) in residual.residuals(p, out_of(p), counters).items():
                    total[k][0] += n
                    total[k][1] += m
            cells = [f"{m}/{n} = {m / max(n, 1):.3f}" for n, m in (total["yunet"], total["scrfd"])]
            print(f"| {name} | {wall:.1f} | {len(photos) / wall:.2f} | {rss:.0f} | {cells[0]} | {cells[1]} |",
                  flush=True)


def parse_table(args) -> None:
    import torch

    import refshim
    from bench_embed import faces_per_s

    refshim.install()
    from facexlib.parsing.bisenet import BiSeNet as FxBiSeNet

    from tidyface.models.bisenet import preprocess
    from tidyface.tasks.parse import parse
    from tidyface.weights import load_model

    torch.set_num_threads(args.threads)
    faces = parse([str(SHARED / "media/insightface_wheel/t1.jpg"), str(SHARED / "media/skimage/astronaut.png")])
    crops = faces.crops[torch.arange(32) % len(faces)].contiguous()
    model = load_model("bisenet_celebamask")
    ref = FxBiSeNet(num_class=19).eval()  # random weights: the same speed
    ours = faces_per_s(lambda x: model.parse(x), crops, args.rounds)
    theirs = faces_per_s(lambda x: ref(preprocess(x))[0], crops, args.rounds)
    print(f"\nparse, batch 32 of 512 px crops, {args.threads} threads: tidyface {ours:.2f} faces/s, "
          f"facexlib BiSeNet {theirs:.2f} faces/s (the same network)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", default=str(VIDEO))
    ap.add_argument("--seconds", type=float, default=None, help="only the first S seconds (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stride", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tables", default="video,photos,parse")
    ap.add_argument("--tools", default="all", help="all, tidyface or deface")
    ap.add_argument("--flags", default="", help='tidyface anonymize flags, e.g. --flags="--region parse"')
    args = ap.parse_args()
    args.flags = args.flags.split()
    if "video" in args.tables:
        video_table(args)
    if "photos" in args.tables:
        photo_table(args)
    if "parse" in args.tables:
        parse_table(args)


if __name__ == "__main__":
    main()
