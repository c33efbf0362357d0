"""YOLOv3 face detector speed on 720p video frames: tidyface vs pytorchyolo 1.8.0, same weights.

    python benchmarks/bench_yolov3.py [--frames 16] [--threads 2] [--rounds 2]
    python benchmarks/bench_yolov3.py --cpu-cost [--frames 4] [--rounds 3]

The real yolov3-wider_16000.weights is not in ../shared, so both load one random .weights for
the face cfg (tests/test_yolov3.py writes both; random weights cost the same convolutions, but
pass more boxes to NMS than real ones would, hence score > 0.7 here, not the default 0.5; at 0.5
pytorchyolo's non_max_suppression hits its 1 s time limit on a loaded machine and stops early). Frames as bench_detect.py reads them (Video_2.mp4,
1280x720, one per second); ms per frame, median over batches (mean in brackets), the lower of
--rounds interleaved rounds, batch 1 and 8, --threads torch threads.

Rows:
- tidyface: `detect(uint8 batch, max_size=416, min_score=0.7)`: letterbox to 416x234 padded to
  416x256, forward, decode, NMS (IoU 0.4).
- pytorchyolo, its input: what its detect_image feeds the network (the frame zero-padded to a
  square at the centre, then nearest-resized to 416x416), Darknet + non_max_suppression (0.7, 0.4).
- pytorchyolo, tidyface's input: the same network and NMS on tidyface's 416x256 letterbox (the
  like-for-like comparison of the two implementations).
- network only, tidyface's input: the letterbox and the forward alone, tidyface (NCHW, as
  `detect` runs it, and channels-last) and pytorchyolo's Darknet (NCHW; its YOLO layers also
  decode).

--cpu-cost: the network-only rows, batch 1, as CPU seconds per frame (`time.process_time`) on one
torch thread, the lowest of --rounds: the work each does, which a loaded shared machine inflates
far less than wall time (where other processes take turns on the same two cores).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import _paths  # noqa: F401  (sys.path: tests/ and the checkout)
from bench_detect import best_of_rounds, read_frames
from test_yolov3 import face_cfg, random_weights

SIDE, MIN_SCORE, NMS_IOU = 416, 0.7, 0.4


def reference_net(cfg: Path, weights: Path):
    import refshim

    refshim.install()  # torchvision's nms for pytorchyolo's non_max_suppression
    sys.modules.setdefault("imgaug", types.ModuleType("imgaug"))  # imported there only for seeding
    from pytorchyolo.models import Darknet
    from pytorchyolo.utils.utils import non_max_suppression

    net = Darknet(str(cfg))
    net.load_darknet_weights(str(weights))
    return net.eval(), non_max_suppression


def square_416(batch: torch.Tensor) -> torch.Tensor:
    """pytorchyolo's detect_image input: zero-pad to a centred square, nearest resize to 416."""
    h, w = batch.shape[-2:]
    d = abs(h - w)
    pad = (0, 0, d // 2, d - d // 2) if h < w else (d // 2, d - d // 2, 0, 0)
    return F.interpolate(F.pad(batch.float() / 255, pad), size=(SIDE, SIDE), mode="nearest")


def cpu_cost(nets: dict, frames, rounds: int) -> int:
    """CPU seconds per frame of each network, batch 1, the lowest of `rounds` interleaved rounds."""
    best: dict = {}
    for fn in nets.values():
        fn(frames[:1])  # warm-up
    for _ in range(rounds):
        for name, fn in nets.items():
            t = time.process_time()
            for f in frames:
                fn([f])
            best[name] = min(best.get(name, float("inf")), (time.process_time() - t) / len(frames))
    print(f"YOLOv3 face network, 416x256 input, 1 thread: CPU s/frame over {len(frames)} frames")
    for name, s in best.items():
        print(f"| {name} | {s:.3f} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpu-cost", action="store_true", help="CPU s/frame of the networks, 1 thread")
    args = ap.parse_args(argv)
    torch.set_num_threads(1 if args.cpu_cost else args.threads)

    from tidyface.models.yolov3 import YOLOv3, convert_darknet, letterbox
    from tidyface.ops.image import to_tensor_batch

    with tempfile.TemporaryDirectory() as tmp:
        cfg, weights = Path(tmp) / "yolov3-face.cfg", Path(tmp) / "random.weights"
        cfg.write_text(face_cfg())
        weights.write_bytes(random_weights())
        ours = YOLOv3()
        ours.load_state_dict(convert_darknet(cfg, weights), strict=True)
        ours.eval()
        ref, nms = reference_net(cfg, weights)
    frames = read_frames(args.frames)

    def tidyface(fs):
        return ours.detect(to_tensor_batch(fs, dtype=torch.uint8), max_size=SIDE, min_score=MIN_SCORE)

    def network(net, layout):
        def run(fs):
            x = letterbox(to_tensor_batch(fs, dtype=torch.uint8), SIDE)[0] / 255
            with torch.no_grad():
                return net(x.contiguous(memory_format=layout))
        return run

    def reference(prepare):
        def run(fs):
            with torch.no_grad():
                return nms(ref(prepare(to_tensor_batch(fs, dtype=torch.uint8))), MIN_SCORE, NMS_IOU)
        return run

    if args.cpu_cost:
        nets = {"tidyface (NCHW)": network(ours, torch.contiguous_format),
                "tidyface (channels-last)": network(ours, torch.channels_last),
                "pytorchyolo": network(ref, torch.contiguous_format)}
        return cpu_cost(nets, frames, args.rounds)
    runs = {"tidyface": tidyface,
            "pytorchyolo, its input (416x416)": reference(square_416),
            "pytorchyolo, tidyface's input (416x256)": reference(lambda b: letterbox(b, SIDE)[0] / 255),
            "network only: tidyface": network(ours, torch.contiguous_format),
            "network only: tidyface, channels-last": network(ours, torch.channels_last),
            "network only: pytorchyolo": network(ref, torch.contiguous_format)}
    best = best_of_rounds(runs, frames, args.rounds)
    print(f"YOLOv3 face, {len(frames)} frames 1280x720, {args.threads} threads: ms/frame, median (mean)")
    print("| implementation | batch 1 | batch 8 |")
    print("|---|---|---|")
    for name in runs:
        print(f"| {name} | " + " | ".join(f"{best[name, b][0]:.0f} ({best[name, b][1]:.0f})" for b in (1, 8)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
