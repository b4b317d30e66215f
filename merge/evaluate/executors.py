"""Run a list of points: in this process (default), on a local process pool, or on Ray.

Every executor gives one result per point, in the points' order. The pool and Ray build one
`Runner` per worker (one model instance, states read once) and send it one point per task.

`RunOptions` are the options every evaluation shares (executor, workers, device, cache,
device_map, progress); the evaluation functions take them as keyword arguments (`RunKwargs`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, TypedDict

from merge.errors import MergeError, UsageError
from merge.evaluate.evaluators import Evaluator
from merge.evaluate.runner import Job, ModelSpec, Point, Runner, resolve_device
from merge.evaluate.weights import StateLike
from merge.threads import pin_threads, threads_per_worker

EXECUTORS = ("sequential", "pool", "ray")

Progress = Callable[[int, Point, dict[str, Any]], None]


@dataclass(frozen=True)
class RunOptions:
    """How an evaluation runs its points: by which executor on how many workers, on which device
    (or spread by `device_map`), with the states where `cache` says (`StateSpace`), and who
    hears of each finished point (`progress`)."""

    executor: str = "sequential"
    workers: int | None = None  # pool/ray workers (default: the CPU count)
    device: str = "cpu"
    cache: str = "auto"
    device_map: str | dict[str, Any] | None = None  # "auto" or {module: device}
    progress: Progress | None = None

    @property
    def same_process(self) -> bool:
        """Points run in this process, so endpoints must reproduce exactly (no tolerance)."""
        return self.executor == "sequential"

    def job(
        self,
        model: ModelSpec,
        states: Mapping[str, StateLike],
        evaluator: Evaluator,
        **extra: Any,
    ) -> Job:
        """The picklable job every worker builds its `Runner` from."""
        return Job(
            model=model,
            states=dict(states),
            evaluator=evaluator,
            device=self.device,
            cache=self.cache,
            device_map=self.device_map,
            **extra,
        )

    def run(
        self, job: Job, points: Sequence[Point], runner: Runner | None = None
    ) -> list[dict[str, Any]]:
        return run_points(
            job,
            points,
            executor=self.executor,
            workers=self.workers,
            runner=runner,
            progress=self.progress,
        )


class RunKwargs(TypedDict, total=False):
    """`RunOptions` as keyword arguments (`interpolation_path(..., executor="pool", workers=2)`)."""

    executor: str
    workers: int | None
    device: str
    cache: str
    device_map: str | dict[str, Any] | None
    progress: Progress | None


def run_points(
    job: Job,
    points: Sequence[Point],
    *,
    executor: str = "sequential",
    workers: int | None = None,
    runner: Runner | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Evaluate `points` with `executor`; `runner` reuses the caller's model for the sequential one."""
    if executor not in EXECUTORS:
        from merge.errors import did_you_mean

        raise UsageError(
            f"unknown executor `{executor}`{did_you_mean(executor, EXECUTORS)}; choose one of {', '.join(EXECUTORS)}"
        )
    if executor == "sequential" or not points:
        runner = runner or Runner(job)
        results = []
        for i, p in enumerate(points):
            results.append(runner.evaluate(p))
            if progress:
                progress(i, p, results[-1])
        return results
    n = max(1, min(workers or os.cpu_count() or 1, len(points)))
    if executor == "pool":
        return _run_pool(job, points, n, progress)
    return _run_ray(job, points, n, progress)


# --- local process pool ---------------------------------------------------------------------

_WORKER: Runner | None = None


def _init_worker(job: Job, threads: int) -> None:
    global _WORKER
    pin_threads(threads)
    _WORKER = Runner(job)


def _evaluate_in_worker(point: Point) -> dict[str, Any]:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.evaluate(point)


def _start_method(job: Job) -> str:
    # fork is fast (no re-import of torch) and safe on CPU; CUDA cannot survive a fork.
    forced = os.environ.get("MERGE_POOL_START_METHOD")
    if forced:
        return forced
    if resolve_device(job.device) != "cpu" or "fork" not in mp.get_all_start_methods():
        return "spawn"
    return "fork"


def _run_pool(
    job: Job, points: Sequence[Point], n: int, progress: Progress | None
) -> list[dict[str, Any]]:
    threads = threads_per_worker(n)
    ctx = mp.get_context(_start_method(job))
    with ProcessPoolExecutor(
        max_workers=n, mp_context=ctx, initializer=_init_worker, initargs=(job, threads)
    ) as ex:
        futures = [ex.submit(_evaluate_in_worker, p) for p in points]
        results = []
        for i, (p, f) in enumerate(zip(points, futures)):
            results.append(f.result())
            if progress:
                progress(i, p, results[-1])
    return results


# --- Ray ------------------------------------------------------------------------------------


class _RayWorker:
    def __init__(self, job: Job):
        pin_threads(1)
        self.runner = Runner(job)

    def evaluate(self, point: Point) -> dict[str, Any]:
        return self.runner.evaluate(point)


def _run_ray(
    job: Job, points: Sequence[Point], n: int, progress: Progress | None
) -> list[dict[str, Any]]:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as e:
        raise UsageError(
            "--executor ray needs Ray, an optional extra: pip install 'mergewright[ray]'"
        ) from e
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if not os.environ.get("RAY_ADDRESS"):
            # A local runtime sized to the workers, whose workers import what this process can
            # (the user's modules next to their script); a cluster brings its own environment.
            kwargs["num_cpus"] = n
            path = [p for p in sys.path if p and os.path.isdir(p)]
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(path)}}
        ray.init(**kwargs)
        started = True
    actor = ray.remote(num_cpus=1)(_RayWorker)
    job_ref = ray.put(job)
    actors: list[Any] = [actor.remote(job_ref) for _ in range(n)]  # type: ignore[attr-defined]
    try:
        results = []
        pool = ActorPool(actors)
        for i, (p, r) in enumerate(
            zip(points, pool.map(lambda a, pt: a.evaluate.remote(pt), list(points)))
        ):
            results.append(r)
            if progress:
                progress(i, p, r)
        return results
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, MergeError):
            raise cause from None
        raise
    except ray.exceptions.RayActorError as e:
        cause = getattr(e, "cause", None) or getattr(e, "error", None)
        if isinstance(cause, MergeError):
            raise cause from None
        raise
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
