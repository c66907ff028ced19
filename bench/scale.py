"""How the pipeline scales with the number of concepts: one run, one table, one JSON.

For N concepts of the default toy world (``mix`` of bench/toyworld.py: a colour, a shape, a
style, then styled colour-shape pairs), each row on an empty artifact store (nothing reused):

- **library**: ``erasure.erase.erase`` in this process (1 torch thread, like one worker),
  then ``evaluate_request``; seconds per stage;
- **flow, 1 and 2 workers**: ``erase_flow`` (Prefect, Ray actors, store, MLflow); seconds per
  stage as the flow reports them, and how many concepts each actor ran;
- **fusion memory**: peak RSS above the baseline and tensor bytes held, for our fusion (the
  stored artifacts read one at a time into sufficient statistics) beside a reference-style
  fusion that keeps every concept's token states and per-projection target vectors, as the
  MACE reference code does; same artifacts, same solve (MACE's), the weights compared;
- **takedown** of one more concept on the largest N's registered model, against erasing all
  N + 1 from scratch (both with warm workers and without evaluation: the evaluation costs
  the same for both), and a **restore** of it.

Evaluation runs for N up to ``--evaluate-up-to`` in every row, and once (flow, 1 worker) at
larger N: it samples every probe with the base and the erased model, which grows with N and
is the same work in every row.

    python bench/scale.py                                   # N = 1, 4, 16, 64 on builtin:toyworld (about 40 min on 2 cores)
    python bench/scale.py --tiny                            # N = 1, 2 on builtin:tiny, a few steps: checks the script
    python bench/scale.py --json bench/results/scale.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TINY_NAMES = ("cat", "dog", "car", "tree", "house", "boat", "plane", "bird")


# --------------------------------------------------------------------------- requests


def concept_pool(tiny: bool, largest: int) -> tuple[list[dict], list[str]]:
    """``largest + 1`` concepts (the last one is the takedown's) and what to preserve."""
    if tiny:
        return [{"name": n, "anchor": "church"} for n in TINY_NAMES[: largest + 1]], []
    from bench.toyworld import mix, retained

    concepts = mix(largest + 1)
    return concepts, retained(concepts)


def request_for(concepts: list[dict], preserve: list[str], tiny: bool):
    from erasure.spec import parse_request

    data = {"concepts": concepts, "preserve": {"concepts": preserve, "lam1": 5, "lam2": 5}, "seed": 0}
    if tiny:
        data |= {
            "model": "builtin:tiny", "fusion": {"method": "mace"},  # the tiny encoder leaves no null space
            "method": {"images_per_concept": 2, "sampler_steps": 3, "lora_steps": 3, "prompts_per_concept": 4},
        }
    return parse_request(data)


def as_json(request) -> dict:
    return json.loads(request.model_dump_json())


# --------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024


def peak_rss_of(call):
    """``call()``'s result, seconds, and the peak resident memory it added (Linux: the peak is
    reset through /proc/self/clear_refs first)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status("VmRSS")
    timer = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - timer
    return result, seconds, max(0, _status("VmHWM") - baseline)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def streamed_fusion(components, folders: list[Path], prior, request):
    """Ours: each stored artifact read, added to the statistics and let go (what a worker does)."""
    from erasure.artifacts import load_concept
    from erasure.fusion import fuse

    largest = [0]

    def one_at_a_time():
        for folder in folders:
            artifact = load_concept(folder)
            held = [*artifact.statistics.to_tensors().values(), artifact.text_map,
                    *(t for pair in artifact.factors.values() for t in pair)]
            largest[0] = max(largest[0], nbytes(held))
            yield artifact

    weights = fuse(components, one_at_a_time(), prior, request.preserve, request.fusion)
    return weights, accumulator_bytes(components, request.fusion) + largest[0]


def accumulator_bytes(components, fusion) -> int:
    """What ``FusionAccumulator`` holds in float64: two d x d sums, one d_out x d per edited projection."""
    from erasure.attention import cross_attention_projections
    from erasure.fusion import edited_weights

    base = {n: p.weight for n, p in cross_attention_projections(components.unet).items()}
    dim = components.text_encoder.config.hidden_size
    return 8 * (2 * dim * dim + sum(w.numel() for w in edited_weights(base, fusion).values()))


def reference_style_fusion(components, folders: list[Path], prior, request):
    """MACE's fusion as the reference code computes it: for every concept, the token states of its
    prompts and, per projection, the target vectors ``(W M_k + dW_k) e``, all kept in lists; the
    normal equations are formed at the end. Each concept's states weigh ``1 / n_k`` so the solve is
    exactly ours (the weights are compared)."""
    from erasure.artifacts import load_concept
    from erasure.attention import cross_attention_projections
    from erasure.closed_form import DTYPE, ridge_value
    from erasure.erase import concept_pairs, concept_seed
    from erasure.text import encode, tokenize

    projections = {n: p.weight.data.to(DTYPE) for n, p in cross_attention_projections(components.unet).items()}
    states_held, targets_held = [], {n: [] for n in projections}
    for folder in folders:
        artifact = load_concept(folder)
        concept = artifact.concept
        pairs, _ = concept_pairs(components, concept, request.method.prompts_per_concept, concept_seed(request.seed, concept))
        ids, _ = tokenize(components.tokenizer, [c for c, _ in pairs])
        states = encode(components.text_encoder, ids).reshape(-1, projections[next(iter(projections))].shape[1]).to(DTYPE)
        states = states / len(states) ** 0.5  # weight 1/n_k in every outer product
        states_held.append(states)
        for name, w in projections.items():
            targets = (states @ artifact.text_map.T) @ w.T  # rows (W M_k e)^T
            if name in artifact.factors:
                up, down = artifact.factors[name]
                targets = targets + (states @ down.to(DTYPE).T) @ up.to(DTYPE).T  # + (dW_k e)^T
            targets_held[name].append(targets)
        prior = prior.with_anchors([artifact.statistics])
    held = nbytes(states_held) + sum(nbytes(t) for t in targets_held.values())
    every_state = torch.cat(states_held)
    prior_gram = prior.gram()
    lam2 = request.preserve.lam2
    denominator = every_state.T @ every_state + lam2 * prior_gram
    r = ridge_value(denominator, request.preserve.ridge)
    eye = torch.eye(len(prior_gram), dtype=DTYPE)
    weights = {}
    for name, w in projections.items():
        targets = torch.cat(targets_held[name])
        numerator = targets.T @ every_state + lam2 * w @ prior_gram + r * w
        weights[name] = torch.linalg.solve(denominator + r * eye, numerator.T).T.to(torch.float32)
    return weights, held


def fusion_memory(components, out: Path, request) -> dict:
    from erasure.artifacts import PRIOR_FILE, load_prior
    from erasure.spec import FusionSettings

    folders = sorted((out / "concepts").iterdir())
    prior = load_prior(out / PRIOR_FILE)
    mace = request.model_copy(update={"fusion": FusionSettings(method="mace")})
    (ours, held_ours), seconds_ours, rss_ours = peak_rss_of(lambda: streamed_fusion(components, folders, prior, mace))
    (ref, held_ref), seconds_ref, rss_ref = peak_rss_of(lambda: reference_style_fusion(components, folders, prior, mace))
    (_, held_default), seconds_default, rss_default = peak_rss_of(
        lambda: streamed_fusion(components, folders, prior, request)
    )
    difference = max(float((ours[n] - ref[n]).abs().max()) for n in ref)
    del ours, ref
    return {
        "ours_mace": {"peak_rss_mib": rss_ours / 2**20, "tensor_mib": held_ours / 2**20, "seconds": seconds_ours},
        "ours_default": {"peak_rss_mib": rss_default / 2**20, "tensor_mib": held_default / 2**20, "seconds": seconds_default,
                         "method": request.fusion.method},
        "reference_style": {"peak_rss_mib": rss_ref / 2**20, "tensor_mib": held_ref / 2**20, "seconds": seconds_ref},
        "max_weight_difference": difference,
    }


# --------------------------------------------------------------------------- rows


def library_row(request, out: Path, evaluate: bool) -> dict:
    from erasure.erase import erase
    from erasure.evaluate import evaluate_request, evaluation_json, has_judge
    from erasure.models import load_components

    evaluate = evaluate and has_judge(request.model)  # builtin:tiny has no judge
    summary = erase(request, out)
    seconds = dict(summary.seconds)
    for stage in ("text", "data", "lora"):
        seconds[stage] = sum(c["seconds"][stage] for c in summary.concepts)
    row = {"seconds": seconds, "wall": seconds["total"]}
    if evaluate:
        timer = time.perf_counter()
        base = load_components(request.model)
        metrics = evaluation_json(evaluate_request(out / "model", request, base_components=base))
        seconds["evaluate"] = time.perf_counter() - timer
        row |= {"wall": seconds["total"] + seconds["evaluate"], "metrics": {k: metrics[k] for k in ("acc_e", "acc_g", "acc_s", "h_o")}}
    return row


def fresh_store(root: Path, label: str) -> None:
    os.environ["ERASURE_STORE"] = str(root / f"store-{label}")


def flow_row(request, name: str, workers: int, root: Path, evaluate: bool) -> dict:
    from flows.erase import erase_flow
    from tasks.compute import drop_pools

    fresh_store(root, name)
    drop_pools()  # every row starts its own actors: their start-up is in "workers"
    timer = time.perf_counter()
    result = erase_flow(as_json(request), name, workers, evaluate)
    wall = time.perf_counter() - timer
    return {
        "seconds": result["seconds"], "wall": wall, "version": result["version"], "ran": len(result["ran"]),
        "concepts_per_worker": sorted(result["concept_workers"].values(), reverse=True),
        **({"metrics": {k: result["metrics"].get(k) for k in ("acc_e", "acc_g", "acc_s", "h_o")}} if evaluate else {}),
    }


def takedown_rows(request, extra: dict, name: str, root: Path) -> dict:
    """On ``name`` (the largest N, 1 worker, its store still set): takedown of ``extra``, its restore,
    then all N + 1 erased from scratch. Workers are warm for all three; nothing is evaluated."""
    from flows.erase import erase_flow
    from flows.restore import restore_flow
    from flows.takedown import takedown_flow
    from tasks.compute import drop_pools, worker_pool

    timer = time.perf_counter()
    takedown = takedown_flow(f"{name}@candidate", [extra], 1, False)
    takedown_wall = time.perf_counter() - timer
    timer = time.perf_counter()
    restore = restore_flow(f"{name}/{takedown['version']}", [extra["name"]], 1, False)
    restore_wall = time.perf_counter() - timer

    everything = request_for([*request_concepts(request), extra], list(request.preserve.concepts), request.model == "builtin:tiny")
    fresh_store(root, f"{name}-scratch")
    drop_pools()
    worker_pool(everything.model, 1)  # warm, as the takedown's were
    timer = time.perf_counter()
    scratch = erase_flow(as_json(everything), f"{name}-scratch", 1, False)
    scratch_wall = time.perf_counter() - timer
    return {
        "takedown": {"wall": takedown_wall, "seconds": takedown["seconds"], "ran": len(takedown["ran"]), "reused": len(takedown["reused"])},
        "restore": {"wall": restore_wall, "seconds": restore["seconds"], "ran": len(restore["ran"]), "reused": len(restore["reused"])},
        "scratch": {"wall": scratch_wall, "seconds": scratch["seconds"], "ran": len(scratch["ran"]), "concepts": len(everything.concepts)},
        "speedup": scratch_wall / takedown_wall,
    }


def request_concepts(request) -> list[dict]:
    return [{"name": c.name, "anchor": c.anchor} for c in request.concepts]


# --------------------------------------------------------------------------- report


def overhead_fit(sizes: list[int], library: dict, flow: dict) -> dict:
    """Flow minus library (evaluation excluded from both) as ``fixed + per_concept * N`` (least
    squares), and the smallest N at which it is under 15 % of the library's time."""
    xs = [float(n) for n in sizes]
    ys = [flow[n]["wall"] - flow[n]["seconds"].get("evaluate", 0.0) - library[n]["seconds"]["total"] for n in sizes]
    lib = [library[n]["seconds"]["total"] for n in sizes]
    if len(sizes) == 1:
        fixed, slope = ys[0], 0.0
    else:
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        fixed = mean_y - slope * mean_x
    # the library's time per concept, from the largest N
    lib_fixed = library[sizes[0]]["seconds"]["total"] - (library[sizes[0]]["seconds"]["concepts"])
    lib_per = library[sizes[-1]]["seconds"]["concepts"] / sizes[-1]
    under = None
    for n in range(1, 100_000):
        if fixed + slope * n < 0.15 * (lib_fixed + lib_per * n):
            under = n
            break
    return {"overhead_seconds": dict(zip(sizes, ys)), "overhead_percent": {n: 100 * y / v for n, y, v in zip(sizes, ys, lib)},
            "fixed_seconds": fixed, "per_concept_seconds": slope, "under_15_percent_from_n": under}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    sizes = report["sizes"]
    table = Table(title=f"scale: {report['model']}, {report['machine']}, {report['date']}")
    table.add_column("row")
    for n in sizes:
        table.add_column(f"N={n}", justify="right")

    def line(label, cell):
        table.add_row(label, *[cell(n) for n in sizes])

    lib, flows = report["library"], report["flow"]
    fmt = lambda value: "" if value is None else f"{value:.1f}"  # noqa: E731
    line("library: prior s", lambda n: fmt(lib[n]["seconds"]["prior"]))
    line("library: text / data / LoRA s", lambda n: "{:.1f} / {:.1f} / {:.1f}".format(*(lib[n]["seconds"][k] for k in ("text", "data", "lora"))))
    line("library: fusion s", lambda n: f"{lib[n]['seconds']['fusion']:.2f}")
    line("library: evaluation s", lambda n: fmt(lib[n]["seconds"].get("evaluate")))
    line("library: write s", lambda n: fmt(lib[n]["seconds"]["write"]))
    line("library: total s (no evaluation)", lambda n: fmt(lib[n]["seconds"]["total"]))
    def flow_lines(label: str, rows: dict) -> None:
        line(f"{label}: workers start s", lambda n: fmt(rows[n]["seconds"]["workers"]))
        line(f"{label}: prior / concepts s", lambda n: f"{rows[n]['seconds']['prior']:.1f} / {rows[n]['seconds']['concepts']:.1f}")
        line(f"{label}: fuse / evaluate / register s", lambda n: "{:.2f} / {:.1f} / {:.1f}".format(*(rows[n]["seconds"][k] for k in ("fuse", "evaluate", "register"))))
        line(f"{label}: wall s", lambda n: fmt(rows[n]["wall"]))
        line(f"{label}: concepts per actor", lambda n: "/".join(str(c) for c in rows[n]["concepts_per_worker"]))

    for workers in report["workers"]:
        flow_lines(f"flow {workers}w", flows[str(workers)])
    fit = report["overhead"]
    line("flow 1w overhead vs library (no evaluation)", lambda n: f"{fit['overhead_seconds'][n]:+.1f} s ({fit['overhead_percent'][n]:+.0f} %)")
    if "2" in flows and "1" in flows:
        line("workers 1 -> 2: concept stage speed-up", lambda n: f"{flows['1'][n]['seconds']['concepts'] / flows['2'][n]['seconds']['concepts']:.2f}x")
        line("workers 1 -> 2: flow speed-up (no start-up)", lambda n: "{:.2f}x".format(
            (flows["1"][n]["wall"] - flows["1"][n]["seconds"]["workers"]) / (flows["2"][n]["wall"] - flows["2"][n]["seconds"]["workers"])))
    memory = report["memory"]
    line("fusion peak RSS MiB: ours (MACE / default)", lambda n: f"{memory[n]['ours_mace']['peak_rss_mib']:.0f} / {memory[n]['ours_default']['peak_rss_mib']:.0f}")
    line("fusion peak RSS MiB: reference-style", lambda n: f"{memory[n]['reference_style']['peak_rss_mib']:.0f}")
    line("fusion tensors MiB: ours / reference-style", lambda n: f"{memory[n]['ours_mace']['tensor_mib']:.1f} / {memory[n]['reference_style']['tensor_mib']:.1f}")
    line("fusion s: ours / reference-style", lambda n: f"{memory[n]['ours_mace']['seconds']:.2f} / {memory[n]['reference_style']['seconds']:.2f}")
    line("fusion max |W ours - W ref|", lambda n: f"{memory[n]['max_weight_difference']:.1e}")
    console.print(table)
    cut = report["takedown"]
    console.print(
        f"N={sizes[-1]}: takedown of 1 concept {cut['takedown']['wall']:.1f} s ({cut['takedown']['ran']} ran, "
        f"{cut['takedown']['reused']} reused) vs {cut['scratch']['concepts']} from scratch {cut['scratch']['wall']:.1f} s: "
        f"{cut['speedup']:.0f}x; restore {cut['restore']['wall']:.1f} s ({cut['restore']['ran']} per-concept stages ran). "
        f"Flow overhead: {fit['fixed_seconds']:.1f} s fixed + {fit['per_concept_seconds']:.2f} s per concept; under 15 % "
        f"from N = {fit['under_15_percent_from_n']}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated concept counts (default 1,4,16,64; --tiny: 1,2)")
    parser.add_argument("--workers", default="1,2", help="flow rows' worker counts")
    parser.add_argument("--evaluate-up-to", type=int, default=16, help="evaluate every row up to this N; above, the 1-worker flow only")
    parser.add_argument("--tiny", action="store_true", help="builtin:tiny with a few steps: checks the script end to end")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in (args.sizes or ("1,2" if args.tiny else "1,4,16,64")).split(","))
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="erasure-scale-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    os.environ["ERASURE_STATE_DIR"] = str(root / "state")
    pool, preserve = concept_pool(args.tiny, sizes[-1])
    requests = {n: request_for(pool[:n], preserve, args.tiny) for n in sizes}
    model = requests[sizes[0]].model
    report = {
        "date": date.today().isoformat(), "model": model, "sizes": sizes, "workers": workers,
        "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, 1 thread per worker",
        "library": {}, "flow": {str(w): {} for w in workers}, "memory": {},
    }

    from erasure.models import load_components

    components = load_components(model)
    for n in sizes:
        out = root / f"library-{n}"
        report["library"][n] = library_row(requests[n], out, evaluate=n <= args.evaluate_up_to)
        report["memory"][n] = fusion_memory(components, out, requests[n])
        print(f"library N={n}: {report['library'][n]['wall']:.1f} s", flush=True)

    from prefect import flow

    @flow
    def noop() -> int:
        return 1

    timer = time.perf_counter()
    noop()
    report["prefect_startup_seconds"] = time.perf_counter() - timer
    for n in sizes:
        for w in workers:
            evaluate = n <= args.evaluate_up_to or w == 1
            report["flow"][str(w)][n] = flow_row(requests[n], f"scale-{n}-{w}w", w, root, evaluate)
            print(f"flow N={n} {w}w: {report['flow'][str(w)][n]['wall']:.1f} s", flush=True)
            if n == sizes[-1] and w == 1:
                os.environ["ERASURE_STORE"] = str(root / f"store-scale-{n}-1w")
                report["takedown"] = takedown_rows(requests[n], pool[sizes[-1]], f"scale-{n}-1w", root)
    report["overhead"] = overhead_fit(sizes, report["library"], report["flow"]["1"] if "1" in report["flow"] else {})

    from tasks.compute import drop_pools

    drop_pools()
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
