"""Orchestration overhead and worker scaling of the pipeline: one table, one run.

Rows, each on an empty artifact store (nothing reused):
- library: ``erasure.erase.erase`` called directly (torch with 1 thread, like one worker);
- flow, 1 worker: ``erase_flow`` (Prefect + Ray + store + MLflow registration);
- per-concept stage, 1 worker vs 2 workers (the fan-out the flow does).
The flow's fixed start-up (Prefect's ephemeral server, Ray, loading the model in
each actor) is measured separately and reported, not hidden.

    python bench/pipeline.py [--concepts 4] [--lora-steps 80]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def request(concepts: int, lora_steps: int, seed: int):
    from erasure.spec import parse_request

    names = ["cat", "dog", "car", "tree", "house", "boat", "plane", "bird"][:concepts]
    return parse_request({
        "model": "builtin:tiny",
        "concepts": [{"name": n, "anchor": "church"} for n in names],
        "method": {"images_per_concept": 4, "sampler_steps": 20, "lora_steps": lora_steps},
        "fusion": {"method": "mace"},  # the tiny model's random 32-wide encoder leaves no null space to constrain to
        "seed": seed,
    })


def fresh_store(root: Path, label: str) -> None:
    os.environ["ERASURE_STORE"] = str(root / f"store-{label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--lora-steps", type=int, default=80)
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    root = Path(tempfile.mkdtemp(prefix="erasure-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    rows = []

    from erasure.erase import erase

    torch.set_num_threads(1)
    spec = request(args.concepts, args.lora_steps, seed=1)
    timer = time.perf_counter()
    erase(spec, root / "direct")
    rows.append(("library: erase() directly, 1 thread", time.perf_counter() - timer))

    # fixed start-up of the orchestrated path, measured on its own
    from prefect import flow

    from tasks.compute import drop_pools, worker_pool

    @flow
    def noop() -> int:
        return 1

    timer = time.perf_counter()
    noop()
    startup_prefect = time.perf_counter() - timer
    fresh_store(root, "warmup")
    timer = time.perf_counter()
    worker_pool("builtin:tiny", 2)
    startup_ray = time.perf_counter() - timer

    from flows.erase import erase_flow

    fresh_store(root, "flow")
    drop_pools()
    worker_pool("builtin:tiny", 1)  # actor start-up counted as start-up, not as flow time
    timer = time.perf_counter()
    result = erase_flow(json.loads(spec.model_dump_json()), "bench", workers=1)
    rows.append(("flow: erase_flow, 1 worker (registered v{})".format(result["version"]), time.perf_counter() - timer))

    from concurrent.futures import ThreadPoolExecutor

    from tasks.keys import concept_key, prior_key

    for workers in (1, 2):
        fresh_store(root, f"stage-{workers}")
        drop_pools()
        pool = worker_pool("builtin:tiny", workers)
        p_key = prior_key(pool.fingerprint, spec)
        pool.prior(spec, p_key)
        keys = [concept_key(pool.fingerprint, concept, spec) for concept in spec.concepts]
        timer = time.perf_counter()
        # every concept at once, as the flow submits them: each runs on whichever worker is idle
        with ThreadPoolExecutor(len(keys)) as threads:
            futures = [threads.submit(pool.concept, spec, i, key, p_key) for i, key in enumerate(keys)]
            [future.result() for future in futures]
        rows.append((f"per-concept stage, {workers} worker(s)", time.perf_counter() - timer))
    drop_pools()

    direct, flow_time = rows[0][1], rows[1][1]
    one, two = rows[2][1], rows[3][1]
    table = Table(title=f"pipeline benchmark: {args.concepts} concepts, tiny model, {args.lora_steps} LoRA steps ({os.cpu_count()} CPUs)")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("vs. reference", justify="right")
    table.add_row(rows[0][0], f"{direct:.1f}", "reference")
    table.add_row(rows[1][0], f"{flow_time:.1f}", f"overhead {100 * (flow_time - direct) / direct:+.0f} %")
    table.add_row(rows[2][0], f"{one:.1f}", "reference")
    table.add_row(rows[3][0], f"{two:.1f}", f"speed-up {one / two:.2f}x")
    table.add_row("fixed start-up: Prefect ephemeral server", f"{startup_prefect:.1f}", "once per process")
    table.add_row("fixed start-up: Ray + 2 actors loading the model", f"{startup_ray:.1f}", "once per process")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
