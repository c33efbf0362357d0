"""Enhancer speed on CPU, tidyface against the ncnn runtime on the same Real-ESRGAN ncnn files,
and the peak memory of enhancing a large photo with tiles.

    python benchmarks/bench_enhance.py [--models realesr_animevideov3_x4_ncnn,...] [--threads 2]
        [--rounds 3] [--tile 256] [--overlap 18] [--frame 1280x720] [--photo 4000x3000]
        [--inputs face,frame] [--no-memory]

Rows per model: ms per 128 px face (one 128x128 crop, astronaut.png's face area-resized) and ms
per frame (a `--frame` sized frame of Video_2.mp4's first frame, resized), both through tiles of
`--tile` input pixels with `--overlap` (the face fits in one tile). tidyface: the model as the
command loads it (`ModelCache.get`) + `ops.tiles.enhance_tiled` (uint8 in and out). ncnn: the `ncnn` PyPI runtime (test-only
dependency) on the same .param/.bin, float16 storage and arithmetic off (so both compute in
float32 from the same float16-stored weights), fed the same windows by the same tiler (an adapter
object), `--threads` threads each; also with ncnn's own default options (its float16 paths where
the CPU has them) against tidyface's `--precision bfloat16` (cache.in_precision). Median of
`--rounds` after one warm-up.

Memory: a fresh process per model enhances a `--photo` sized photo (astronaut.png resized) with
tiles at the model's scale; its peak resident set during the call (VmHWM reset after the model and
photo are loaded, so it counts the output image, the windows and the network's activations) and
the size of the output alone. Large photos take long on CPU (x4plus: ~17 MMAC per input pixel).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _paths import ROOT, SHARED, VIDEO

NCNN_DIR = SHARED / "weights/realesrgan_ncnn"
MODELS = ("realesr_animevideov3_x2_ncnn", "realesr_animevideov3_x3_ncnn", "realesr_animevideov3_x4_ncnn",
          "realesrgan_x4plus_anime_ncnn", "realesrgan_x4plus_ncnn")


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux)")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := the current resident set


def resized(size: tuple[int, int], source: str = "photo") -> np.ndarray:
    import cv2

    from tidyface.ops.image import read_image

    if source == "frame":
        ok, bgr = cv2.VideoCapture(str(VIDEO)).read()
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok else read_image(SHARED / "media/skimage/astronaut.png")
    else:
        img = read_image(SHARED / "media/skimage/astronaut.png")
        if source == "face":
            img = img[60:220, 150:310]
    return np.ascontiguousarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA))


class NcnnEnhancer:
    """The ncnn runtime behind tidyface's Enhancer call, so the same tiler feeds both."""

    def __init__(self, spec, threads: int, float32: bool = True):
        import ncnn

        stem = spec.files[0].filename.rsplit(".", 1)[0]
        self.spec, self.net = spec, ncnn.Net()
        opt = self.net.opt
        opt.use_vulkan_compute = False
        if float32:
            opt.use_fp16_packed = opt.use_fp16_storage = opt.use_fp16_arithmetic = False
        opt.num_threads = threads
        self.net.load_param(str(NCNN_DIR / f"{stem}.param"))
        self.net.load_model(str(NCNN_DIR / f"{stem}.bin"))

    def enhance(self, images):
        import ncnn
        import torch

        outs = []
        for img in images:
            data = np.ascontiguousarray(img.float().numpy() / 255, dtype=np.float32)
            ex = self.net.create_extractor()
            ex.input("data", ncnn.Mat(data).clone())
            _, out = ex.extract("output")
            outs.append(torch.from_numpy(np.clip(np.array(out), 0, 1) * 255))
        return torch.stack(outs)


def ms_per_call(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def speed_rows(name: str, args) -> list[list[str]]:
    import torch

    from tidyface.cache import ModelCache
    from tidyface.ops.tiles import enhance_tiled

    cache = ModelCache()  # as the command loads them (CPU weights channels-last)
    ours = cache.get(name, "cpu")
    sides = (NcnnEnhancer(ours.spec, args.threads), ours,
             NcnnEnhancer(ours.spec, args.threads, float32=False), cache.get(name, "cpu", precision="bfloat16"))
    rows = []
    inputs = {"face": ("128 px face", lambda: resized((128, 128), "face")),
              "frame": (f"{args.frame[0]}x{args.frame[1]} frame", lambda: resized(args.frame, "frame"))}
    for what, img in ((inputs[k][0], inputs[k][1]()) for k in args.inputs.split(",")):
        x = torch.from_numpy(img).permute(2, 0, 1)[None]
        t = [ms_per_call(lambda m=m: enhance_tiled(m, x, args.tile, args.overlap), args.rounds) for m in sides]
        rows.append([name, what, f"{t[0]:.0f}", f"{t[1]:.0f}", f"{t[0] / t[1]:.2f}x",
                     f"{t[2]:.0f}", f"{t[3]:.0f}", f"{t[2] / t[3]:.2f}x"])
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
    return rows


def memory_child(name: str, size: tuple[int, int], tile: int, overlap: int, threads: int) -> dict:
    import torch

    from tidyface.cache import ModelCache
    from tidyface.ops.tiles import enhance_tiled

    torch.set_num_threads(threads)
    model = ModelCache().get(name, "cpu")
    x = torch.from_numpy(resized(size)).permute(2, 0, 1)[None]
    reset_peak()
    base = vm_hwm_mib()
    t = time.perf_counter()
    out = enhance_tiled(model, x, tile, overlap)
    return {"model": name, "photo": f"{size[0]}x{size[1]}", "out": "x".join(map(str, out.shape[:1:-1])),
            "seconds": time.perf_counter() - t, "peak_mib": vm_hwm_mib() - base,
            "output_mib": out.numel() * out.element_size() / 2**20, "base_mib": base}


def size_arg(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=18)
    ap.add_argument("--frame", type=size_arg, default=(1280, 720))
    ap.add_argument("--photo", type=size_arg, default=(4000, 3000))
    ap.add_argument("--inputs", default="face,frame", help="speed rows: face, frame or both (the RRDB "
                    "files take minutes per 720p frame)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.photo, args.tile, args.overlap, args.threads)))
        return
    import torch

    from tidyface.ops.memory import keep_freed_memory

    keep_freed_memory()  # the speed rows run as the `tidyface` command would (both sides share it)
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}, tile {args.tile}, overlap {args.overlap}, rounds {args.rounds}, "
          "allocator: the tidyface command setting (the memory rows: glibc default, fresh processes)")
    print("| model | input | ncnn float32 ms | tidyface float32 ms | speed-up | ncnn defaults ms "
          "| tidyface bfloat16 ms | speed-up |\n|---|---|---|---|---|---|---|---|")
    models = args.models.split(",")
    for name in models:
        speed_rows(name, args)
    if args.no_memory:
        return
    print("\n| model | photo -> output | seconds | peak RSS MiB during the call | of which the output |")
    print("|---|---|---|---|---|")
    for name in models:
        cmd = [sys.executable, __file__, "--memory-child", name, "--photo", "x".join(map(str, args.photo)),
               "--tile", str(args.tile), "--overlap", str(args.overlap), "--threads", str(args.threads)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
        print(f"| {r['model']} | {r['photo']} -> {r['out']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} "
              f"| {r['output_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
