"""`video2faces --engine ray`: the detection stage on a Ray cluster, grouping on the driver.

Facts from Ray's documentation (docs.ray.io, Ray 2.x actors and fault tolerance): an actor made
with max_restarts is started again after its process dies, and with max_task_retries the call it
was running is sent again to the restarted actor; ray.wait hands back calls as they finish;
ray.init() without an address joins the cluster `ray start` runs on this machine, else starts one.

One actor per worker loads the models once (its own ModelCache) and runs the local run's own
per-unit function (video2faces.detect_unit: a video, or a chunk of one) on what it is given, so
faces and tables land in the output folder exactly as the local run writes them, each file
atomically. The folder must be one every node reaches at the same path. Only this driver writes
the manifest: entries are made 'pending' in the units' order first (the grouping stage reads the
tables in manifest order, so in the local run's order), then filled as results arrive.
Ray is an optional extra, imported here only: the local path never imports this module.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..cache import ModelCache
from .common import load_models, warn
from .outdir import OutputFolder
from .video2faces import Unit, Video2FacesError, Workspace, detect_unit, finished, unit_files

# A unit whose worker dies is sent again this many times (on the restarted worker) before it
# counts as failed: a file that crashes the decoder must not take the whole run down with it.
RETRIES = 2
# Test hook: a file path; the first worker task to create it (O_EXCL: one across all workers)
# kills its own process at once, as an out-of-memory kill or a lost node would.
DIE_ONCE_ENV = "TIDYFACE_RAY_TEST_DIE_ONCE"


def import_ray():
    try:
        import ray
    except ImportError:
        raise Video2FacesError('--engine ray needs Ray: pip install "tidyface[ray]"') from None
    return ray


def _worker_env() -> dict:
    """The driver's TIDYFACE_* settings (weights store, mirror, offline), for workers on other
    machines, whose shells did not set them."""
    return {k: v for k, v in os.environ.items() if k.startswith("TIDYFACE_")}


class DetectionWorker:
    """A Ray actor: the models loaded once, then detect_unit per call."""

    def __init__(self, o, out: str, cwd: str):
        import torch

        if os.path.isdir(cwd):  # relative input paths name what they name for the driver
            os.chdir(cwd)
        torch.set_num_threads(max(1, int(o.worker_cpus)))  # its share, not the machine's cores
        self.o, self.ws = o, Workspace(Path(out))
        needed = (o.det_model, o.enc_model) + ((o.enh_model,) if o.enhance_below else ())
        self.models = ModelCache()
        load_models(self.models, o.device, o.weights_dir, *needed, precision=o.precision)
        self.writer = ThreadPoolExecutor(2)
        self.first_call = True

    def run(self, unit: Unit) -> dict:
        """The unit's manifest record; 'retried' is added when this is the call that a restart
        of this worker sent again (one call at a time goes to a worker)."""
        import ray

        _die_once_for_tests()
        rec = detect_unit(unit, self.o, self.ws, self.models, self.writer)
        if self.first_call and _reconstructed(ray):
            rec["retried"] = True
        self.first_call = False
        return rec


def _reconstructed(ray) -> bool:
    import warnings

    with warnings.catch_warnings():  # Ray's property reads a deprecated one of its own
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _die_once_for_tests() -> None:
    marker = os.environ.get(DIE_ONCE_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(3)


def _connect(ray, o) -> bool:
    """Join --ray-address (or the local cluster, or start one); -> whether this run started it
    (and so shuts it down). A process that already called ray.init keeps its own."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=o.ray_address, logging_level=logging.WARNING, log_to_driver=True)
    except ConnectionError as e:
        raise Video2FacesError(f"--ray-address {o.ray_address}: no Ray cluster there ({e})") from None
    return True


def _worker_count(ray, o, units: int) -> int:
    """--workers, else as many as the cluster's CPUs (or GPUs with --worker-gpus) hold."""
    if o.workers:
        return min(o.workers, units)
    res = ray.cluster_resources()
    fit = res.get("GPU", 0) / o.worker_gpus if o.worker_gpus else res.get("CPU", 1) / o.worker_cpus
    return max(1, min(units, int(fit + 1e-9)))


def detect_on_ray(units: list[Unit], o, ws: Workspace, man: dict, folder: OutputFolder) -> list[dict]:
    """The detection stage of every unit not finished earlier, on Ray workers; -> the reject
    rows of all units, in the units' order."""
    ray = import_ray()
    rejects, todo = {}, []
    for u in units:
        earlier = finished(u, o, ws, man)
        if earlier is not None:
            rejects[u.key] = earlier
        else:
            todo.append(u)
            man["videos"].setdefault(u.key, {"path": str(u.path), "status": "pending", **u.record()})
    ws.save_manifest(man)
    if todo:
        started = _connect(ray, o)
        try:
            rejects.update(_run_units(ray, todo, o, ws, man, folder))
        finally:
            if started:
                ray.shutdown()
        _remove_stale_parts(ws)
    return [row for u in units for row in rejects.get(u.key, [])]


def _run_units(ray, todo: list[Unit], o, ws: Workspace, man: dict, folder: OutputFolder) -> dict:
    """Hand units to idle workers until all are done; record each result as it arrives."""
    worker = ray.remote(DetectionWorker).options(
        num_cpus=o.worker_cpus, num_gpus=o.worker_gpus, max_restarts=RETRIES, max_task_retries=RETRIES,
        runtime_env={"env_vars": _worker_env()})
    queue, running, rejects, retried, actors = deque(todo), {}, {}, [], []

    def spawn():
        actors.append(worker.remote(o, str(ws.out.resolve()), os.getcwd()))
        return actors[-1]

    for _ in range(_worker_count(ray, o, len(todo))):
        spawn()
    replacements = len(todo)  # a worker that dies for good is replaced, but not forever

    def submit(actor) -> None:
        if queue:
            unit = queue.popleft()
            running[actor.run.remote(unit)] = (actor, unit)

    try:
        for a in list(actors):
            submit(a)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, unit = running.pop(ref)
            try:
                rec = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # died on every try; a bug in a worker re-raises
                why = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
                warn(f"{unit.label}: its Ray worker died {RETRIES + 1} times ({why[:200]})")
                rec = {"path": str(unit.path), "status": "failed",
                       "error": f"its Ray worker died {RETRIES + 1} times", **unit.record()}
                actor = spawn() if replacements > 0 else None
                replacements -= 1
            if rec.pop("retried", False):
                retried.append(unit.label)
            man["videos"][unit.key] = rec
            ws.save_manifest(man)
            folder.record(unit_files(ws, unit))
            rejects[unit.key] = rec.get("rejects", [])
            if actor is not None:
                submit(actor)
        for u in queue:  # no worker left to take them
            man["videos"][u.key] = {"path": str(u.path), "status": "failed", "error": "no Ray worker left",
                                    **u.record()}
        ws.save_manifest(man)
    finally:
        for a in actors:  # also on Ctrl-C: no worker goes on writing into the folder
            ray.kill(a)
    for label in retried:
        print(f"tidyface: ray: a worker died while detecting {label}; run again on its restarted worker",
              file=sys.stderr)
    return rejects


def _remove_stale_parts(ws: Workspace) -> None:
    """Half-written files of workers that were killed (their cleanup never ran): every worker
    has stopped and the folder is this run's, so none is being written now."""
    for folder in (ws.faces, ws.inter, ws.state):
        if folder.is_dir():
            for p in list(folder.rglob(".*.part-*")) + list(folder.glob("*.crops.part")):
                p.unlink(missing_ok=True)
