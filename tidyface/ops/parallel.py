"""How tidyface shares the CPU threads torch may use: between a video decoder and the models, and
between frames whose ops are too small to keep torch's own intra-op threads busy (MTCNN's
cascade: ~2900 torch calls per frame)."""
from __future__ import annotations

import functools
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

# Torch releases the GIL inside each op and holds it for the Python between ops: on 2 cores two
# workers lost nothing to it (benchmarks/RESULTS.md), but more cores were not measured; the cap
# keeps the share of time spent queueing for the GIL small where the cores are many.
MAX_WORKERS = 4


def split_cpu_threads(device) -> tuple[int | None, int | None]:
    """(decoder threads, torch threads) for decoding video while models run on `device`.

    On CPU the two share the cores that torch may use, half each. Both at full width oversubscribe
    the cores, and an OpenMP team whose partner thread is descheduled by the decoder waits at every
    barrier: on 2 cores a video2faces run of Video_2.mp4 took 3.4-3.7 s that way and 2.5-2.7 s
    split 1 + 1. On a GPU the decoder keeps its default: (None, None)."""
    if torch.device(device).type != "cpu":
        return None, None
    total = torch.get_num_threads()
    decode = max(1, total // 2)
    return decode, max(1, total - decode)


def side_workers(threads: int, count: int = 1) -> ThreadPoolExecutor:
    """`count` threads that run torch at `threads` intra-op threads each, for models that work
    beside the caller's thread (video2faces detects on two while it embeds on a third); shut
    it down when done."""
    return _new_pool((threads,) * count, "tidyface-side")


def in_order(fn: Callable[[T], R], items: Iterable[T], pool: ThreadPoolExecutor | None,
             depth: int = 2) -> Iterator[R]:
    """fn(x) for x in items, yielded in order; with a pool, up to `depth` items at once on its
    threads, so memory stays bounded. fn runs in the caller's grad and inference mode (both per
    thread), on whichever thread, as it would without a pool."""
    if pool is None:
        yield from map(fn, items)
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(x):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(x)

    pending: deque = deque()
    for x in items:
        pending.append(pool.submit(run, x))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to n inside the block (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


def worker_threads(n_items: int, device) -> tuple[int, ...]:
    """torch threads of each worker for n_items on device: the cores torch may use, shared out
    one worker per core up to MAX_WORKERS (spare cores go to the first workers). Empty where the
    work should stay on the caller's thread: one item, one core, or not a CPU (a GPU queues the
    kernels of one thread without waiting on them)."""
    threads = torch.get_num_threads()
    workers = min(n_items, threads, MAX_WORKERS)
    if torch.device(device).type != "cpu" or workers < 2:
        return ()
    return tuple(threads // workers + (i < threads % workers) for i in range(workers))


def map_frames(fn: Callable[[T], R], items: Sequence[T], device) -> list[R]:
    """[fn(x) for x in items], in order; on CPU run by worker_threads() worker threads.

    On 2 cores one MTCNN frame keeps torch's two threads busy only ~80% of the time (121 CPU-ms
    on one thread; 74 ms wall, 147 CPU-ms on two); two frames at once on one thread each use
    both cores. fn runs on a worker thread: thread-local state (grad or inference mode) is its own.
    """
    shares = worker_threads(len(items), device)
    if not shares:
        return [fn(x) for x in items]
    # Restored after, not changed: a worker's set_num_threads also moves the process-wide default.
    with torch_threads(torch.get_num_threads()):
        return list(_pool(shares).map(fn, items))


@functools.lru_cache(maxsize=1)
def _pool(shares: tuple[int, ...]) -> ThreadPoolExecutor:
    """map_frames' workers, kept between calls: each keeps its own OpenMP team (torch's thread
    count is per thread) warm."""
    return _new_pool(shares, "tidyface-frames")


def _new_pool(shares: tuple[int, ...], name: str) -> ThreadPoolExecutor:
    """One thread per share, each running torch at its share of intra-op threads."""
    share = iter(shares)
    lock = threading.Lock()

    def start():
        with lock:
            # get first: torch sets a thread's count on its first query, from the process-wide
            # default that the other workers' set_num_threads move; after that it stays the
            # thread's own.
            torch.get_num_threads()
            torch.set_num_threads(next(share))

    return ThreadPoolExecutor(len(shares), thread_name_prefix=name, initializer=start)


# A forked child inherits the pool but not its threads: it would wait on them forever.
os.register_at_fork(after_in_child=_pool.cache_clear)
