"""Anime-face ViT throughput on CPU: tidyface's animesion ViT-B/16 and ViT-L/16 against timm's
VisionTransformer configured the same (PyPI timm, test-only), batch 1 and 32.

    python benchmarks/bench_vit.py [--threads 2] [--rounds 3] [--variants vit_anime_b16 vit_anime_l16]

Both networks get the same random weights (no animesion checkpoint is on these machines; the
values do not change the speed), written in animesion's layout and mapped by tests/test_vit.py:
tidyface through its converter, timm through the test's own key map, with timm's fused attention
kernel (its default) switched back on. Each side does the same work per batch: 128x128 RGB
0..255 crops (shared/media/tidy_torch_models anime faces, repeated) -> normalised input ->
network -> L2-normalised embeddings. faces/s from the median of `rounds` timed calls after one
warm-up call each, the two sides' calls alternating.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import _paths  # noqa: F401  (puts tests/ and the checkout on sys.path)


def faces_per_s(fns, x, rounds: int) -> list[float]:
    """faces/s of each fn on x: rounds alternate between them, so a load that drifts on a
    shared machine weighs on all alike."""
    times = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            fn(x)
        for _ in range(rounds):
            for fn, ts in zip(fns, times):
                t = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t)
    return [len(x) / statistics.median(ts) for ts in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["vit_anime_b16", "vit_anime_l16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import test_vit as tv

    from tidyface.models.vit import preprocess

    faces = tv.anime_faces(2)
    batches = {n: faces[torch.arange(n) % len(faces)].contiguous() for n in (1, 32)}
    rows = []
    for name in args.variants:
        dim, depth, _ = tv.CONFIGS[name]
        ckpt = tv.random_checkpoint(dim, depth, distinct_blocks=4)  # cheap to draw; same speed
        ours, ref = tv.tidyface_vit(name, ckpt), tv.timm_vit(name, ckpt)
        for block in ref.blocks:
            block.attn.fused_attn = True  # timm's default path, the fair comparison

        def timm_embed(crops, ref=ref):
            return F.normalize(ref(preprocess(crops)), dim=1)

        for n, x in batches.items():
            rows.append((name, n, *faces_per_s([ours.embed, timm_embed], x, args.rounds)))
        del ours, ref, ckpt
    import timm

    print(f"\nCPU, torch threads {args.threads}, median of {args.rounds} alternating calls after a warm-up")
    print(f"| model | batch | tidyface faces/s | timm {timm.__version__} faces/s | tidyface / timm |\n"
          "|---|---|---|---|---|")
    for name, n, ours_fps, timm_fps in rows:
        print(f"| {name} | {n} | {ours_fps:.2f} | {timm_fps:.2f} | {ours_fps / timm_fps:.2f} |")


if __name__ == "__main__":
    main()
