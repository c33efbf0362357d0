"""What Real-ESRGAN does to small faces (issue 14): faces shrunk by a known factor, brought back
by bicubic resizing or by each registered Real-ESRGAN model, compared with the original in
pixels (PSNR, SSIM) and in identity (cosine similarity of face embeddings).

    python benchmarks/eval_enhance.py [--faces 30] [--min-width 200] [--threads 2] [--full] [--jpeg Q]

Faces: RetinaFace mnet0.25 boxes >= `--min-width` px wide in the photos of ../shared/media
(listed as bench_anonymize.py lists them; drawn anime and cartoon pictures left out: the
encoders are trained on photos), `--faces` of them spread evenly over that list. Each face's
square of 1.3x its box (kept inside the image) is area-resized to the original O, 256 and 128 px;
O is area-shrunk by 2, 4 and 8 (the small face) and restored to O's size:

    bicubic          cv2.INTER_CUBIC straight to O's size
    <model>          the model's own scale; then area-downsized (2x shrinks, x4 models) or
                     bicubic-upsized by 2 (8x shrinks), as the "how" column says
    direct           no restoration: the encoders align straight from the small face (what a
                     pipeline without enhancement feeds them); identity only

RRDB models (x4plus, x4plus-anime) on the 2x shrinks only with --full: x4plus took 1.3 to 22 s
per 64 px face here, with the load (a 2x shrink of 256 px is a 128 px face). Identity:
facenet_casia_tf and mobilefacenet embeddings of crops aligned with the original face's 5
detected points, scaled into each image, so every image is aligned identically; cos is against
O's embedding. PSNR/SSIM (skimage, channel_axis) on RGB
0..255 (restorations rounded to uint8) over the whole square. --jpeg Q: each small face goes
through a JPEG round trip at quality Q first (video faces come compressed; Real-ESRGAN is trained
on degraded inputs), the same for every method. ms/face: median wall time of the
restoration alone (model + resize), one face per call, CPU, `--threads` torch threads. On a
shared machine, 2 oneDNN threads that wait for each other are slower than 1 (measured under a
load of 14 on 2 cores: x4plus-anime on a 64 px face 9.5-17.9 s with 2 threads, 2.5-2.9 s with
1), so time only when the machine is otherwise idle, or compare rows of one run only.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from _paths import SHARED

DETECTOR = "retinaface_mnet025"
ENCODERS = ("facenet_casia_tf", "mobilefacenet")
AV3_X2, AV3_X4 = "realesr_animevideov3_x2_ncnn", "realesr_animevideov3_x4_ncnn"
ANIME_X4, X4PLUS = "realesrgan_x4plus_anime_ncnn", "realesrgan_x4plus_ncnn"
X4_MODELS = (AV3_X4, ANIME_X4, X4PLUS)
ORIGINALS = (256, 128)
SHRINKS = (2, 4, 8)
REGION = 1.3  # the square around the box, as a multiple of the box's longer side
DRAWN = ("anime_face_detector", "aniface", "anime_det", "cartoon_det")  # not photos


def photos() -> list[Path]:
    media = SHARED / "media"
    skip = ("facebank", "database", "test_images_aligned")
    return sorted(p for p in media.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                  and not any(s in p.parts for s in skip)
                  and not any(str(p.relative_to(media)).startswith(d) or p.name.startswith(d) for d in DRAWN))


def methods_for(shrink: int, full: bool) -> list[tuple[str, str | None]]:
    """(label, model name or None for bicubic) restoring a `shrink`-times smaller face."""
    rows = [("bicubic", None)]
    if shrink == 2:
        rows.append((AV3_X2, AV3_X2))
        rows += [(m, m) for m in (X4_MODELS if full else (AV3_X4,))]
    else:
        rows += [(m, m) for m in X4_MODELS]
    return rows


def big_faces(models, min_width: float) -> list[dict]:
    """Every face >= min_width px wide whose 1.3x square fits the image (shifted inside it):
    the square's pixels and the face's 5 points and box width and height in the square's pixels."""
    import torch

    from tidyface.ops.image import read_image
    from tidyface.tasks.pipeline import detect_stream, slice_boxes

    detector = models.get(DETECTOR, "cpu")
    found = []
    stream = ((p, read_image(p)) for p in photos())
    for path, img, det in detect_stream(stream, detector, batch_size=1):
        h, w = img.shape[:2]
        keep = (det.boxes[:, 2] - det.boxes[:, 0]) >= min_width
        if not bool(keep.any()):
            continue
        det = det.select(keep)
        squares = slice_boxes(det.boxes, w, h, (REGION,) * 4, square=True)
        for k, (x1, y1, x2, y2) in enumerate(squares.tolist()):
            if x2 - x1 != y2 - y1:  # larger than the image: it cannot stay square
                continue
            found.append({"path": path, "pixels": np.ascontiguousarray(img[y1:y2, x1:x2]),
                          "points": (det.landmarks[k] - torch.tensor([x1, y1])).double().numpy(),
                          "box_w": float(det.boxes[k, 2] - det.boxes[k, 0]),
                          "box_h": float(det.boxes[k, 3] - det.boxes[k, 1])})
    return found


def spread(items: list, n: int) -> list:
    """n items spread evenly over the list (all of them when it has no more)."""
    if len(items) <= n:
        return items
    return [items[math.floor(i * len(items) / n)] for i in range(n)]


def scaled(points: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Points of a src px square in a dst px resize of it (pixel-centre coordinates)."""
    return (points + 0.5) * (dst / src) - 0.5


def embed_aligned(encoder, images: list[np.ndarray], points: list[np.ndarray]) -> np.ndarray:
    """(N,D) embeddings of the images' faces, each aligned through its own 5 points."""
    import torch

    from tidyface.tasks.pipeline import align, as_chw, encode, encoder_geometry
    from tidyface.types import Detections

    lm = torch.tensor(np.stack(points), dtype=torch.float32)
    dets = Detections(torch.cat([lm.amin(1), lm.amax(1)], 1), torch.ones(len(lm)), lm,
                      torch.arange(len(lm)))
    faces = align([as_chw(im) for im in images], dets, encoder_geometry(encoder))
    return encode(encoder, faces.crops).numpy()


def restore(small: np.ndarray, side: int, model) -> tuple[np.ndarray, str, float]:
    """The small face brought to side x side (uint8), how, and the milliseconds it took."""
    import cv2
    import torch

    start = time.perf_counter()
    if model is None:
        out, how = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC), "cv2 cubic"
    else:
        with torch.inference_mode():
            y = model.enhance(torch.from_numpy(small).permute(2, 0, 1)[None])[0]
            out = np.ascontiguousarray(y.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        how = f"x{model.spec.meta.scale}"
        if out.shape[0] > side:
            how += f", area /{out.shape[0] // side}"
            out = cv2.resize(out, (side, side), interpolation=cv2.INTER_AREA)
        elif out.shape[0] < side:
            how += f", cubic x{side // out.shape[0]}"
            out = cv2.resize(out, (side, side), interpolation=cv2.INTER_CUBIC)
    return out, how, 1000 * (time.perf_counter() - start)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255 ** 2 / mse) if mse else math.inf


def jpeg(image: np.ndarray, quality: int | None) -> np.ndarray:
    """The RGB image after a JPEG round trip at `quality` (None: unchanged)."""
    import cv2

    if quality is None:
        return image
    _, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def evaluate_face(face: dict, models, encoders: dict, plan: dict, results: dict,
                  quality: int | None = None) -> None:
    """Append this face's numbers to results[(O px, shrink, method)] (a dict of lists)."""
    import cv2
    from skimage.metrics import structural_similarity

    side = face["pixels"].shape[0]
    for o in ORIGINALS:
        orig = cv2.resize(face["pixels"], (o, o), interpolation=cv2.INTER_AREA)
        at_o = scaled(face["points"], side, o)
        images, points, keys = [orig], [at_o], [None]
        for k in SHRINKS:
            small = jpeg(cv2.resize(orig, (o // k, o // k), interpolation=cv2.INTER_AREA), quality)
            images.append(small), points.append(scaled(at_o, o, o // k)), keys.append((o, k, "direct"))
            results[(o, k, "direct")]["box"].append(face["box_w"] * o / side / k)
            results[(o, k, "direct")]["box_h"].append(face["box_h"] * o / side / k)
            for label, name in plan[k]:
                out, how, ms = restore(small, o, models.get(name, "cpu") if name else None)
                rec = results[(o, k, label)]
                rec["how"] = [how]
                rec["psnr"].append(psnr(out, orig))
                rec["ssim"].append(structural_similarity(orig, out, channel_axis=2, data_range=255))
                rec["ms"].append(ms)
                images.append(out), points.append(at_o), keys.append((o, k, label))
        for enc_name, enc in encoders.items():
            emb = embed_aligned(enc, images, points)
            for key, c in zip(keys[1:], emb[1:] @ emb[0]):
                results[key][enc_name].append(float(c))


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def cells(results: dict):
    """(O px, shrink, small face px, its mean box width px, [method labels]) in table order."""
    for o in ORIGINALS:
        for k in SHRINKS:
            labels = [m for (oo, kk, m) in results if (oo, kk) == (o, k)]
            yield o, k, o // k, statistics.fmean(results[(o, k, "direct")]["box"]), labels


def print_table(results: dict) -> None:
    print("| O px | shrink | small face px (box w x h) | method | how | faces | PSNR dB | SSIM | "
          "cos facenet | cos mobilefacenet | ms/face |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for o, k, small, box, labels in cells(results):
        for m in labels:
            r = results[(o, k, m)]
            n = len(r[ENCODERS[0]])
            px = "—" if m == "direct" else f"{statistics.fmean(r['psnr']):.2f}"
            ss = "—" if m == "direct" else f"{statistics.fmean(r['ssim']):.4f}"
            ms = "—" if m == "direct" else f"{statistics.median(r['ms']):.{1 if m == 'bicubic' else 0}f}"
            how = "aligned from the small face" if m == "direct" else r["how"][0]
            cos = " | ".join(f"{statistics.fmean(r[e]):.4f}" for e in ENCODERS)
            bh = statistics.fmean(results[(o, k, "direct")]["box_h"])
            print(f"| {o} | {k}x | {small} ({box:.0f} x {bh:.0f}) | {m} | {how} | {n} | {px} | {ss} | {cos} | {ms} |")


def verdict(results: dict, key: tuple, base: tuple) -> tuple[str, float, list[str]]:
    """raises / lowers (every encoder's paired mean difference beyond 2 standard errors, one
    way) or unclear; the mean difference over the encoders; the differences as text."""
    signs, means, text = set(), [], []
    for e in ENCODERS:
        d = [a - b for a, b in zip(results[key][e], results[base][e])]
        m, se = mean_se(d)
        means.append(m)
        text.append(f"{m:+.4f} ± {se:.4f}")
        signs.add(1 if m - 2 * se > 0 else -1 if m + 2 * se < 0 else 0)
    word = {frozenset({1}): "raises", frozenset({-1}): "lowers"}.get(frozenset(signs), "unclear")
    return word, statistics.fmean(means), text


def print_deltas(results: dict) -> dict[int, list[tuple[str, str]]]:
    """The paired differences in cos of each model against bicubic and against direct
    alignment; returns, per small face px, each cell's best model (largest mean difference
    against bicubic) and its verdict."""
    print("\nPaired differences in cos to the original (mean ± standard error over faces):\n")
    print("| O px | shrink | small face px (box px) | model | vs bicubic: facenet | mobilefacenet | verdict "
          "| vs direct: facenet | mobilefacenet | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_size: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for o, k, small, box, labels in cells(results):
        best = None
        for m in labels:
            if m in ("direct", "bicubic"):
                continue
            v_b, mean, t_b = verdict(results, (o, k, m), (o, k, "bicubic"))
            v_d, _, t_d = verdict(results, (o, k, m), (o, k, "direct"))
            best = max(best or (mean, m, v_b), (mean, m, v_b))
            print(f"| {o} | {k}x | {small} ({box:.0f}) | {m} | {t_b[0]} | {t_b[1]} | {v_b} "
                  f"| {t_d[0]} | {t_d[1]} | {v_d} |")
        by_size[small].append((best[1], best[2]))
    for o, k, small, box, labels in cells(results):
        v, _, t = verdict(results, (o, k, "bicubic"), (o, k, "direct"))
        print(f"| {o} | {k}x | {small} ({box:.0f}) | (bicubic) | | | | {t[0]} | {t[1]} | {v} |")
    return by_size


def recommend(results: dict, by_size: dict[int, list[tuple[str, str]]]) -> None:
    """--enhance-below as a box width in the frame: between the largest small-face size at
    which the best model raises identity over bicubic (in some cell of that size, lowering it in
    none) and the next larger size tested, if the best model lowers it at no smaller size."""
    boxes = {small: statistics.fmean(b for o, k, s, b, _ in cells(results) if s == small)
             for small in by_size}
    sizes = sorted(by_size)
    state = {}
    print("\nPer small-face size (px of the 1.3x square; mean box width px), each cell's best model vs bicubic:")
    for small in sizes:
        words = {v for _, v in by_size[small]}
        state[small] = ("raises" if "lowers" not in words else "mixed") if "raises" in words else \
            "lowers" if "lowers" in words else "unclear"
        print(f"  {small} px (box ~{boxes[small]:.0f}): {state[small]} "
              f"({'; '.join(f'{m} {v}' for m, v in by_size[small])})")
    raised = [s for s in sizes if state[s] == "raises"]
    if not raised or any(state[s] in ("lowers", "mixed") for s in sizes if s < raised[-1]):
        print("\nRecommendation: leave --enhance-below off (no size at which the best model raises "
              "identity over bicubic without lowering it at a smaller size).")
        return
    top = raised[-1]
    larger = [s for s in sizes if s > top]
    if not larger:
        print(f"\nThe best model raises identity up to the largest size tested ({top} px, box "
              f"~{boxes[top]:.0f} px); test larger faces before choosing --enhance-below.")
        return
    px = round(math.sqrt(boxes[top] * boxes[larger[0]]))
    print(f"\nThe best model raises identity over bicubic at {top} px (box ~{boxes[top]:.0f} px), lowers it "
          f"at no smaller size, and does not raise it at {larger[0]} px (box ~{boxes[larger[0]]:.0f} px): "
          f"--enhance-below {px} (box width; geometric midpoint)")


def warm_up(models, plan: dict) -> None:
    """One call per model and input size first, so no timed call pays a first-run cost."""
    import torch

    for o in ORIGINALS:
        for k in SHRINKS:
            for _, name in plan[k]:
                if name:
                    with torch.inference_mode():
                        models.get(name, "cpu").enhance(torch.zeros(1, 3, o // k, o // k))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", type=int, default=30, help="faces to use, spread over all that qualify")
    ap.add_argument("--min-width", type=float, default=200, help="smallest box width, px")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also the RRDB models on the 2x shrinks")
    ap.add_argument("--jpeg", type=int, default=None, help="JPEG quality of the small faces (default: none)")
    args = ap.parse_args()
    import torch

    from tidyface.cache import ModelCache

    torch.set_num_threads(args.threads)
    models = ModelCache()
    start, load = time.perf_counter(), os.getloadavg()[0]
    found = big_faces(models, args.min_width)
    faces = spread(found, args.faces)
    print(f"{len(found)} faces >= {args.min_width:.0f} px wide whose {REGION}x square fits, in "
          f"{len({f['path'] for f in found})} photos; {len(faces)} used, from "
          f"{len({f['path'] for f in faces})} photos; {args.threads} threads; small faces "
          + (f"JPEG quality {args.jpeg}" if args.jpeg else "not compressed"), flush=True)
    plan = {k: methods_for(k, args.full) for k in SHRINKS}
    encoders = {e: models.get(e, "cpu") for e in ENCODERS}
    warm_up(models, plan)
    results: dict = defaultdict(lambda: defaultdict(list))
    for i, face in enumerate(faces):
        evaluate_face(face, models, encoders, plan, results, args.jpeg)
        print(f"  face {i + 1}/{len(faces)} ({face['path'].name}, box {face['box_w']:.0f} px) done at "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print()
    print_table(results)
    recommend(results, print_deltas(results))
    print(f"\ntotal {time.perf_counter() - start:.0f} s; 1-minute load {load:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
