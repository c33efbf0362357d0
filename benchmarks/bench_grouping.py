"""Speed and peak memory of the dedup and grouping passes on synthetic 512-d embeddings.

    python benchmarks/bench_grouping.py [--sizes 10000,100000] [--threads 2]

Data: 200 identities (random unit centres; faces = centre + Gaussian noise, cosine distance
~0.2 to the centre, ~0.35 between two faces of one identity), a quarter of the faces are
near-copies of another face of their identity (video-like, distance ~0.01), and 2% strangers
(isolated random points). Steps, each timed once in a fresh process; the grouping steps go
through `tidyface.tasks.pipeline.group` (the group step the tasks call) with a GroupOptions:
  dedup     the embedding pass, tasks.dedup.embedding_duplicates, thr 0.03 (pipeline.dedup
            calls it on the rows the hash pass kept; here there are no hashes)
  auto      auto grouping at AUTO_THRESHOLD (no encoder spec, so no encoder default; exact
            agglomerative up to AGGLOMERATIVE_MAX_N faces, tiled graph + per-component above)
  cluster   KMeans for k in 190,200,210 (around the true 200), n_init=N_INIT, silhouette on a
            10k sample above 10k faces
  classify  against 200 references (one per identity), other_threshold 0.5
Peak memory is the step's own peak resident set (VmHWM reset after the data is made), so it
includes torch and numpy buffers; tracemalloc's peak (numpy + Python only) is shown beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from _paths import ROOT
STEPS = ("dedup", "auto", "cluster", "classify")
IDENTITIES, DIM, CLUSTERS = 200, 512, "190,200,210"


def make_data(n: int, seed: int = 0):
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(IDENTITIES, DIM, generator=g), dim=1)
    n_strange = n // 50
    n_id = n - n_strange
    n_copy = n_id // 4
    n_base = n_id - n_copy
    y = torch.randint(0, IDENTITIES, (n_base,), generator=g)
    x = torch.empty(n, DIM)
    for s in range(0, n_base, 8192):  # chunked, so making the data is not the memory peak
        yy = y[s:s + 8192]
        x[s:s + len(yy)] = torch.nn.functional.normalize(
            centres[yy] + 0.03 * torch.randn(len(yy), DIM, generator=g), dim=1)
    src = torch.randint(0, n_base, (n_copy,), generator=g)  # near-copies of a face, same identity
    for s in range(0, n_copy, 8192):
        ss = src[s:s + 8192]
        x[n_base + s:n_base + s + len(ss)] = torch.nn.functional.normalize(
            x[ss] + 0.004 * torch.randn(len(ss), DIM, generator=g), dim=1)
    y = torch.cat([y, y[src]])
    x[n_id:] = torch.nn.functional.normalize(torch.randn(n_strange, DIM, generator=g), dim=1)
    labels = np.concatenate([y.numpy(), -np.ones(n_strange, dtype=np.int64)])
    quality = torch.rand(n, generator=g).numpy()
    return x, labels, quality, centres


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n: int, step: str, threads: int) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import adjusted_rand_score

    from tidyface.tasks.dedup import embedding_duplicates
    from tidyface.tasks.pipeline import GroupOptions, group

    torch.set_num_threads(threads)
    x, y, q, centres = make_data(n)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure the step alone
    base = vm_hwm_mib()
    tracemalloc.start()
    t = time.perf_counter()
    if step == "dedup":
        r = embedding_duplicates(x, q, thr=0.03)
    elif step == "auto":
        g = group(x, GroupOptions(mode="auto"))
    elif step == "cluster":
        g = group(x, GroupOptions(mode="cluster", clusters=CLUSTERS))
    elif step == "classify":
        g = group(x, GroupOptions(mode="classify", enc_oth_thr=0.5),
                  references=lambda: (centres, [str(i) for i in range(IDENTITIES)]))
    secs = time.perf_counter() - t
    peak = vm_hwm_mib()  # before the scoring below
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    if step == "dedup":
        extra = f"{int((~r.keep).sum())} dropped in {len(r.groups)} sets"
    elif step == "classify":
        lab = np.array(g.labels)
        extra = (f"accuracy {(lab[y >= 0] == y[y >= 0].astype(str)).mean():.3f}, "
                 f"other {int((lab == 'other').sum())}")
    else:
        lab = np.array(g.labels)
        extra = (f"k={g.details['chosen_k']}" if step == "cluster" else
                 f"{g.details['n_groups']} groups, {int((lab == 'unassigned').sum())} unassigned")
        extra += f", ARI {adjusted_rand_score(y, lab):.3f}"
    return {"n": n, "step": step, "seconds": secs, "peak_rss_mib": peak, "base_rss_mib": base,
            "traced_mib": traced, "extra": extra}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("N", "STEP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.threads)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    rows = []
    for n in map(int, args.sizes.split(",")):
        for step in args.steps.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), step, "--threads", str(args.threads)],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{step} at {n} failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"# {n} {step}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
            rows.append(r)
    print(f"\n{DIM}-d embeddings, {IDENTITIES} identities, torch/OpenMP threads {args.threads}\n")
    print("| faces | step | seconds | step peak RSS MiB (process base) | tracemalloc peak MiB | result |")
    print("|---:|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['step']} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} ({r['base_rss_mib']:.0f}) "
              f"| {r['traced_mib']:.0f} | {r['extra']} |")


if __name__ == "__main__":
    main()
