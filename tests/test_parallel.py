"""map_frames: per-frame work on CPU worker threads, in order, with torch's thread count restored."""
import os
import threading
import time

import pytest
import torch

from tidyface.ops.parallel import MAX_WORKERS, map_frames, worker_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_workers_share_out_the_cpu_threads(threads):
    torch.set_num_threads(2)
    assert worker_threads(8, "cpu") == (1, 1)
    assert worker_threads(1, "cpu") == ()  # one frame: torch's own threads do the work
    assert worker_threads(8, torch.device("cuda")) == ()  # a GPU queues one thread's kernels
    torch.set_num_threads(1)
    assert worker_threads(8, "cpu") == ()  # video2faces' model share while decoding
    torch.set_num_threads(6)
    assert worker_threads(8, "cpu") == (2, 2, 1, 1)  # every core used
    assert worker_threads(3, "cpu") == (2, 2, 2)
    torch.set_num_threads(4 * MAX_WORKERS)
    assert worker_threads(8, "cpu") == (4,) * MAX_WORKERS


def test_map_keeps_order_runs_on_workers_and_restores_threads(threads):
    torch.set_num_threads(2)
    seen = []

    def fn(x):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return torch.full((2,), float(x)).sum().item()

    assert map_frames(fn, list(range(9)), "cpu") == [2.0 * x for x in range(9)]
    assert map_frames(fn, list(range(9)), "cpu") == [2.0 * x for x in range(9)]  # kept workers
    assert {name.startswith("tidyface-frames") for name, _ in seen} == {True}
    assert {n for _, n in seen} == {1}
    assert torch.get_num_threads() == 2
    torch.set_num_threads(3)  # two frames: a new share-out of 2 + 1 threads, on fresh workers
    seen.clear()
    map_frames(lambda x: time.sleep(0.05) or fn(x), [1, 2], "cpu")
    assert sorted(n for _, n in seen) == [1, 2] and torch.get_num_threads() == 3
    torch.set_num_threads(1)  # one thread: the caller's thread does it all
    seen.clear()
    map_frames(fn, [1, 2], "cpu")
    assert seen == [(threading.current_thread().name, 1)] * 2


def test_worker_errors_reach_the_caller(threads):
    torch.set_num_threads(2)

    def fn(x):
        if x == 3:
            raise ValueError("frame 3")
        return x

    with pytest.raises(ValueError, match="frame 3"):
        map_frames(fn, list(range(6)), "cpu")
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_gets_its_own_pool(threads):
    torch.set_num_threads(2)
    map_frames(lambda x: time.sleep(0.05), [1, 2, 3, 4], "cpu")  # the parent's pool has 2 idle threads
    pid = os.fork()
    if pid == 0:  # child: the inherited pool has no threads; a fresh one must serve it
        import signal
        signal.alarm(20)
        ok = map_frames(lambda x: x + 1, [1, 2, 3], "cpu") == [2, 3, 4]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_in_order_keeps_order_bounds_the_work_in_flight_and_reports_errors():
    from tidyface.ops.parallel import in_order, side_workers

    started, active, most = [], [0], [0]
    lock = threading.Lock()

    def fn(x):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        started.append(x)
        time.sleep(0.02 * (x % 3))  # later items may finish first
        with lock:
            active[0] -= 1
        assert torch.is_inference_mode_enabled() and torch.get_num_threads() == 1
        return x * x

    pool = side_workers(1, 2)
    try:
        with torch.inference_mode():  # the caller's mode reaches the workers
            assert list(in_order(fn, iter(range(10)), pool)) == [x * x for x in range(10)]
        assert most[0] == 2  # two at once, never more
        with torch.inference_mode():
            consumed = in_order(fn, iter(range(100)), pool)
            next(consumed)
        time.sleep(0.1)
        assert len(started) <= 10 + 3  # a slow consumer holds back the items it has not asked for
        consumed.close()
        with pytest.raises(ZeroDivisionError):
            list(in_order(lambda x: 1 // (x - 4), range(8), pool))
        assert list(in_order(lambda x: torch.is_grad_enabled(), range(3), pool)) == [True] * 3
        with torch.no_grad():
            assert list(in_order(lambda x: torch.is_grad_enabled(), range(3), pool)) == [False] * 3
    finally:
        pool.shutdown()
    assert list(in_order(lambda x: x + 1, range(3), None)) == [1, 2, 3]  # no pool: the caller's thread
