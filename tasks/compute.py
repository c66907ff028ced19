"""Ray: a pool of ``ConceptWorker`` actors, one per GPU (or per CPU without GPUs).

The same code runs on a local ``ray.init()`` (bound to 127.0.0.1) and on a cluster
(``RAY_ADDRESS``). Pools are kept per process and model, so consecutive flows in
one process reuse loaded models instead of paying for actor start-up again.
"""

from __future__ import annotations

import itertools
import os
import threading
import time

import ray

from tasks.store import store_settings
from tasks.worker import ConceptWorker

_pools: dict[tuple, WorkerPool] = {}
_lock = threading.Lock()


def ensure_ray() -> None:
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # local: listen on loopback only, no dashboard, workers inherit our environment
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=False,
            num_cpus=int(os.environ.get("ERASURE_RAY_CPUS", os.cpu_count() or 1)),
        )


class WorkerPool:
    """``size`` actors holding ``model``; calls go round robin."""

    def __init__(self, model: str, size: int):
        ensure_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
        resource = "GPU" if gpus >= 1 else "CPU"
        deadline = time.time() + 30  # actors just killed release their resources asynchronously
        while (available := ray.available_resources().get(resource, 0)) < size and time.time() < deadline:
            time.sleep(0.2)
        if available < size:
            raise RuntimeError(
                f"{size} worker(s) need {size} {resource}(s) but Ray has {available:g} free "
                f"({ray.cluster_resources().get(resource, 0):g} in all); ask for fewer --workers"
            )
        store_url, endpoint = store_settings()
        options = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
        threads = None if gpus >= 1 else 1  # one torch thread per CPU actor: actors share the cores
        actor = ray.remote(max_restarts=1, max_task_retries=0)(ConceptWorker)
        self.model, self.store_url, self.endpoint = model, store_url, endpoint
        self.actors = [actor.options(**options).remote(model, store_url, endpoint, None, threads) for _ in range(size)]
        self._next = itertools.cycle(range(size))
        try:
            # every actor must be up (model loaded, store reachable) before the pool serves
            fingerprints = ray.get([a.fingerprint.remote() for a in self.actors])
        except Exception:
            self.shutdown()
            raise
        self.fingerprint = fingerprints[0]

    def call(self, method: str, *args, actor: int | None = None):
        """Run ``method`` on an actor (round robin unless ``actor`` is given) and wait for it."""
        index = next(self._next) if actor is None else actor % len(self.actors)
        return ray.get(getattr(self.actors[index], method).remote(*args))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def worker_pool(model: str, size: int) -> WorkerPool:
    """The process's pool for ``model``: reused when it has at least ``size`` workers, else
    replaced (pools hold their CPUs/GPUs, so two pools side by side could starve each other)."""
    store_url, endpoint = store_settings()
    with _lock:
        for (pool_model, pool_size, pool_store, pool_endpoint), pool in _pools.items():
            if (pool_model, pool_store, pool_endpoint) == (model, store_url, endpoint) and pool_size >= size:
                return pool
        for pool in _pools.values():
            pool.shutdown()
        _pools.clear()
        pool = _pools[(model, size, store_url, endpoint)] = WorkerPool(model, size)
        return pool


def drop_pools() -> None:
    with _lock:
        for pool in _pools.values():
            pool.shutdown()
        _pools.clear()
