"""Where many independent tasks run: worker processes on this machine, or Ray tasks on a cluster.

``prepare`` (tokenizing domains and files) and ``importance score`` (scoring domains) hand a list of tasks to
``engine_runner``; each task writes its result to storage (a cache, a sidecar) and returns a small summary, so
either engine writes the same files.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from onlinemix.loaders.cache.entries import LIMIT_ENV
from onlinemix.loaders.cache.folder import CACHE_ENV
from onlinemix.loaders.extras import require

ENGINES = ("local", "ray")
THREAD_VARIABLES = ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS", "OMP_NUM_THREADS")  # tokenizers' and torch's pools
PARENT_POLL_S = 0.5  # how often a local worker checks that its parent is alive


def thread_shares(workers: int) -> dict[str, str]:
    """The environment that gives each of ``workers`` processes its share of the cores for a Hugging Face
    tokenizer's thread pool and torch's (``encode_batch`` and a model's matrix products run on all of them by
    default: ``workers`` processes would each start one thread per core and fight over them). A value the user
    set is kept."""
    share = str(max(1, (os.cpu_count() or 1) // workers))
    return {name: os.environ.get(name, share) for name in THREAD_VARIABLES}


def _set_environment(values: dict[str, str], parent: int) -> None:
    """A worker process's initializer (module level: spawn pickles it by name): its environment, its torch
    threads (torch may be imported already, by the parent's main module), and a watch that ends the worker when
    ``parent`` does — a pool's workers otherwise outlive a parent that was killed, and go on using the cores."""
    os.environ.update(values)
    torch = sys.modules.get("torch")
    if torch is not None and values.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(values["OMP_NUM_THREADS"]))
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="onlinemix-parent-watch").start()


def _exit_with(parent: int) -> None:
    """End this process once ``parent`` is gone (it is then no longer this process's parent)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


@contextmanager
def engine_runner(
    engine: str, workers: int, function: Callable[..., Any]
) -> Iterator[Callable[[list[tuple], tqdm], dict[tuple, Any]]]:
    """A function that runs ``function(*task)`` for a list of tasks (tuples of picklable arguments) on ``workers``
    workers of ``engine`` (``local`` or ``ray``), ticking ``bar`` per task, and returns the results by task; the
    workers (a process pool, a Ray cluster) live as long as the ``with`` block. ``function`` must be importable by
    name (a module-level function): the workers import it."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "ray":
        yield from _on_ray(workers, function)
    elif workers == 1:
        yield lambda tasks, bar: {task: _counted(function(*task), bar) for task in tasks}
    else:  # spawned, not forked: a worker starts clean of the parent's threads and open files
        context = multiprocessing.get_context("spawn")
        threads = thread_shares(workers)
        setup = (threads, os.getpid())
        with ProcessPoolExecutor(workers, context, initializer=_set_environment, initargs=setup) as pool:

            def run(tasks: list[tuple], bar: tqdm) -> dict[tuple, Any]:
                futures = {pool.submit(function, *task): task for task in tasks}
                return {futures[future]: _counted(future.result(), bar) for future in as_completed(futures)}

            yield run


def _counted(result: Any, bar: tqdm) -> Any:
    bar.update()
    return result


def _on_ray(workers: int, function: Callable[..., Any]) -> Iterator[Callable[[list[tuple], tqdm], dict[tuple, Any]]]:
    """Ray tasks, at most ``workers`` at a time. (Ray core tasks rather than Ray Data: a task's output is a
    file on storage, so there are no blocks to stream between them.)"""
    ray = require("ray", "--engine ray")
    started_here = not ray.is_initialized()
    if started_here:  # joins $RAY_ADDRESS when it is set, else starts a local cluster of `workers` CPUs
        ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else workers, log_to_driver=False)
    try:
        env = {name: os.environ[name] for name in (CACHE_ENV, LIMIT_ENV) if os.environ.get(name)}
        env |= thread_shares(1)  # one CPU per task: its tokenizer's thread pool too
        remote = ray.remote(function).options(num_cpus=1, runtime_env={"env_vars": env})

        def run(tasks: list[tuple], bar: tqdm) -> dict[tuple, Any]:
            results, pending, queue = {}, {}, list(tasks)
            while queue or pending:
                while queue and len(pending) < workers:
                    task = queue.pop(0)
                    pending[remote.remote(*task)] = task
                done, _ = ray.wait(list(pending), num_returns=1)
                for reference in done:
                    results[pending.pop(reference)] = _counted(ray.get(reference), bar)
            return results

        yield run
    finally:
        if started_here:
            ray.shutdown()
