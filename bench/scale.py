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
  the same for both), and a **restore** of one of the model's concepts (a concept set never
  fused before: no per-concept stage, one fusion).

Each fusion-memory figure is taken in a fresh process (peak RSS reset through
/proc/self/clear_refs just before the fusion), so no earlier allocation hides or inflates it.
Prefect's temporary API server and Ray start once, before the flow rows, and no row pays
them; each flow row starts its own actors ("workers start").

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
import math
import os
import platform
import re
import shutil
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
    """Ours: each stored artifact read, added to the statistics and let go (what a worker does).
    Tensor bytes: the statistics it holds, plus the largest artifact (held while it is added)."""
    from erasure.artifacts import load_concept
    from erasure.core.text import empty_prompt_states
    from erasure.methods.fusion import accumulate, base_weights, solved_weights

    largest = [0]

    def one_at_a_time():
        for folder in folders:
            artifact = load_concept(folder)
            held = [*artifact.statistics.to_tensors().values(), artifact.text_map,
                    *(t for pair in artifact.factors.values() for t in pair)]
            largest[0] = max(largest[0], nbytes(held))
            yield artifact

    statistics = accumulate(base_weights(components), one_at_a_time(), request.fusion, prior)
    accumulator = statistics.accumulator
    held = nbytes([accumulator.gram_sum, accumulator.mapped_gram_sum, *accumulator.lora_terms.values(), statistics.prior.total])
    weights = solved_weights(
        empty_prompt_states(components), accumulator, statistics.edited, statistics.prior.gram(), request.preserve, request.fusion
    )
    return statistics.base | weights, held + largest[0]


def reference_style_fusion(components, folders: list[Path], prior, request):
    """MACE's fusion as the reference code computes it: for every concept, the token states of its
    prompts (encoded here, as the reference does) and, per projection, the target vectors
    ``(W M_k + dW_k) e``, all kept in lists; the normal equations are formed at the end. Each
    concept's states weigh ``1 / n_k`` so the solve is exactly ours (the weights are compared)."""
    from erasure.artifacts import load_concept
    from erasure.core.attention import cross_attention_projections
    from erasure.core.closed_form import DTYPE, ridge_value
    from erasure.core.text import encode, tokenize
    from erasure.erase import concept_pairs, concept_seed

    if request.method.mining is not None:
        raise ValueError("the reference-style fusion has no neighbour mining: run the benchmark without method.mining")
    dim = components.text_encoder.config.hidden_size
    projections = {n: p.weight.data.to(DTYPE) for n, p in cross_attention_projections(components.unet).items()}
    states_held, targets_held = [], {n: [] for n in projections}
    for folder in folders:
        artifact = load_concept(folder)
        concept = artifact.concept
        pairs, _ = concept_pairs(components, concept, request.method.prompts_per_concept, concept_seed(request.seed, concept))
        ids, _ = tokenize(components.tokenizer, [c for c, _ in pairs])
        states = encode(components.text_encoder, ids).reshape(-1, dim).to(DTYPE)
        states = states / len(states) ** 0.5  # weight 1/n_k in every outer product
        states_held.append(states)
        for name, w in projections.items():
            targets = (states @ artifact.text_map.T) @ w.T  # rows (W M_k e)^T
            if name in artifact.factors:
                up, down = artifact.factors[name]
                targets = targets + (states @ down.to(DTYPE).T) @ up.to(DTYPE).T  # + (dW_k e)^T
            targets_held[name].append(targets)
        prior = prior.with_anchors([artifact.statistics])
    held = nbytes(states_held) + sum(nbytes(t) for t in targets_held.values()) + nbytes(projections.values())
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


FUSIONS = {"ours_mace": streamed_fusion, "ours_default": streamed_fusion, "reference_style": reference_style_fusion}


def measure_fusion(kind: str, out: str, request_json: dict, weights_path: str) -> dict:
    """One fusion in a fresh process (so no earlier allocation hides its peak): peak RSS above the
    process's state just before it, tensor bytes held, seconds; the weights saved for comparison."""
    from safetensors.torch import save_file

    from erasure.artifacts import PRIOR_FILE, load_prior
    from erasure.loading import load_components
    from erasure.spec import FusionSettings, parse_request

    torch.set_num_threads(1)
    request = parse_request(request_json)
    if kind != "ours_default":
        request = request.model_copy(update={"fusion": FusionSettings(method="mace")})
    components = load_components(request.model)
    folders = sorted((Path(out) / "concepts").iterdir())
    prior = load_prior(Path(out) / PRIOR_FILE)
    (weights, held), seconds, rss = peak_rss_of(lambda: FUSIONS[kind](components, folders, prior, request))
    save_file({n: w.contiguous() for n, w in weights.items()}, weights_path)
    return {"peak_rss_mib": rss / 2**20, "tensor_mib": held / 2**20, "seconds": seconds, "method": request.fusion.method}


def fusion_memory(out: Path, request) -> dict:
    import multiprocessing

    from safetensors.torch import load_file

    context = multiprocessing.get_context("spawn")
    report = {}
    for kind in FUSIONS:
        with context.Pool(1) as pool:
            report[kind] = pool.apply(measure_fusion, (kind, str(out), as_json(request), str(out / f"{kind}.safetensors")))
    ours, ref = (load_file(str(out / f"{kind}.safetensors")) for kind in ("ours_mace", "reference_style"))
    report["max_weight_difference"] = max(float((ours[n] - ref[n]).abs().max()) for n in ref)
    return report


# --------------------------------------------------------------------------- rows


def library_row(request, out: Path, evaluate: bool) -> dict:
    from erasure.erase import erase
    from erasure.evaluation.evaluate import evaluate_request, evaluation_json, has_judge
    from erasure.loading import load_components

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
    """On ``name`` (the largest N, 1 worker, its store still set): takedown of ``extra``, then a
    restore of the model's first concept (a concept set never fused before: the fusion runs), then
    all N + 1 erased from scratch. Workers are warm for all three; nothing is evaluated."""
    from flows.erase import erase_flow
    from flows.restore import restore_flow
    from flows.takedown import takedown_flow
    from tasks.compute import drop_pools, worker_pool

    timer = time.perf_counter()
    takedown = takedown_flow(f"{name}@candidate", [extra], 1, False)
    takedown_wall = time.perf_counter() - timer
    timer = time.perf_counter()
    restore = restore_flow(f"{name}/{takedown['version']}", [request.concepts[0].name], 1, False)
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
        "restore": {"wall": restore_wall, "seconds": restore["seconds"], "ran": len(restore["ran"]), "reused": len(restore["reused"]),
                    "concept": request.concepts[0].name},
        "scratch": {"wall": scratch_wall, "seconds": scratch["seconds"], "ran": len(scratch["ran"]), "concepts": len(everything.concepts)},
        "speedup": scratch_wall / takedown_wall,
    }


def request_concepts(request) -> list[dict]:
    return [{"name": c.name, "anchor": c.anchor} for c in request.concepts]


# --------------------------------------------------------------------------- report


def overhead_fit(sizes: list[int], library: dict, flow: dict) -> dict:
    """Flow minus library (evaluation excluded from both) as ``fixed + per_concept * N`` (least
    squares), and the smallest N at which it is under 15 % of the library's time (the library's
    own time as ``fixed + per_concept * N`` too)."""
    def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
        if len(xs) == 1:
            return ys[0], 0.0
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        return mean_y - slope * mean_x, slope

    keys = [str(n) for n in sizes]
    lib = [library[k]["seconds"]["total"] for k in keys]
    extra = [flow[k]["wall"] - flow[k]["seconds"].get("evaluate", 0.0) - v for k, v in zip(keys, lib)]
    fixed, slope = line([float(n) for n in sizes], extra)
    lib_fixed, lib_slope = line([float(n) for n in sizes], lib)
    # fixed + slope N < 0.15 (lib_fixed + lib_slope N)  <=>  N (0.15 lib_slope - slope) > fixed - 0.15 lib_fixed;
    # when the flow's cost per concept is 15 % of the library's or more, no N is large enough
    gain, gap = 0.15 * lib_slope - slope, fixed - 0.15 * lib_fixed
    if gain > 0:
        under = 1 if gap < 0 else math.floor(gap / gain) + 1
    else:  # not falling with N: under 15 % everywhere only if it already is at N = 1 and never grows
        under = 1 if gain == 0 and gap < 0 else None
    return {"overhead_seconds": dict(zip(keys, extra)), "overhead_percent": {k: 100 * y / v for k, y, v in zip(keys, extra, lib)},
            "fixed_seconds": fixed, "per_concept_seconds": slope, "under_15_percent_from_n": under}


def print_table(report: dict, markdown: bool = False) -> None:
    """The report as a table (rich), or as Markdown for the README."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    sizes = [str(n) for n in report["sizes"]]
    title = f"scale: {report['model']}, {report['machine']}, {report['date']}"
    rows: list[list[str]] = []

    def line(label, cell):
        rows.append([label, *[cell(n) for n in sizes]])

    lib, flows = report["library"], report["flow"]
    fmt = lambda value: "" if value is None else f"{value:.1f}"  # noqa: E731
    line("library: prior s", lambda n: fmt(lib[n]["seconds"]["prior"]))
    line("library: text / data / LoRA s (all concepts)", lambda n: "{:.1f} / {:.1f} / {:.1f}".format(*(lib[n]["seconds"][k] for k in ("text", "data", "lora"))))
    line("library: fusion s", lambda n: f"{lib[n]['seconds']['fusion']:.2f}")
    line("library: evaluation s", lambda n: fmt(lib[n]["seconds"].get("evaluate")))
    line("library: write s", lambda n: fmt(lib[n]["seconds"]["write"]))
    line("library: total s (load to write, no evaluation)", lambda n: fmt(lib[n]["seconds"]["total"]))

    def flow_lines(label: str, rows: dict) -> None:
        line(f"{label}: workers start s", lambda n: fmt(rows[n]["seconds"]["workers"]))
        line(f"{label}: prior / concepts s", lambda n: f"{rows[n]['seconds']['prior']:.1f} / {rows[n]['seconds']['concepts']:.1f}")
        line(f"{label}: fuse / evaluate / register s", lambda n: "{:.2f} / {:.1f} / {:.1f}".format(*(rows[n]["seconds"][k] for k in ("fuse", "evaluate", "register"))))
        line(f"{label}: wall s", lambda n: fmt(rows[n]["wall"]))
        line(f"{label}: concepts per actor", lambda n: "/".join(str(c) for c in rows[n]["concepts_per_worker"]))

    for workers in report["workers"]:
        flow_lines(f"flow {workers}w", flows[str(workers)])
    fit = report.get("overhead")
    if fit:
        line("flow 1w overhead vs library (no evaluation)", lambda n: f"{fit['overhead_seconds'][n]:+.1f} s ({fit['overhead_percent'][n]:+.0f} %)")
    if "2" in flows and "1" in flows:
        def work(row: dict) -> float:  # the flow's wall without the actors' start-up and the evaluation
            return row["wall"] - row["seconds"]["workers"] - row["seconds"]["evaluate"]

        line("workers 1 -> 2: concept stage speed-up", lambda n: f"{flows['1'][n]['seconds']['concepts'] / flows['2'][n]['seconds']['concepts']:.2f}x")
        line("workers 1 -> 2: flow speed-up (no start-up, no evaluation)", lambda n: f"{work(flows['1'][n]) / work(flows['2'][n]):.2f}x")
    memory = report["memory"]
    line("fusion peak RSS MiB: ours, MACE / default", lambda n: f"{memory[n]['ours_mace']['peak_rss_mib']:.1f} / {memory[n]['ours_default']['peak_rss_mib']:.1f}")
    line("fusion peak RSS MiB: reference-style", lambda n: f"{memory[n]['reference_style']['peak_rss_mib']:.1f}")
    line("fusion tensors MiB: ours / reference-style", lambda n: f"{memory[n]['ours_mace']['tensor_mib']:.1f} / {memory[n]['reference_style']['tensor_mib']:.1f}")
    line("fusion s: ours / reference-style (encodes)", lambda n: f"{memory[n]['ours_mace']['seconds']:.2f} / {memory[n]['reference_style']['seconds']:.2f}")
    line("fusion: largest weight difference, ours vs reference-style", lambda n: f"{memory[n]['max_weight_difference']:.1e}")
    if markdown:
        print("| | " + " | ".join(f"N={n}" for n in sizes) + " |")
        print("|---|" + "---:|" * len(sizes))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        table = Table(title=title)
        table.add_column("row")
        for n in sizes:
            table.add_column(f"N={n}", justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    cut = report.get("takedown")
    if cut:
        console.print(
            f"N={sizes[-1]}: takedown of 1 concept {cut['takedown']['wall']:.1f} s ({cut['takedown']['ran']} ran, "
            f"{cut['takedown']['reused']} reused) vs {cut['scratch']['concepts']} from scratch {cut['scratch']['wall']:.1f} s: "
            f"{cut['speedup']:.0f}x; restore of {cut['restore']['concept']!r} {cut['restore']['wall']:.1f} s "
            f"({cut['restore']['ran']} per-concept stages ran, fuse {cut['restore']['seconds']['fuse']:.1f} s). Warm workers, no evaluation."
        )
    if fit:
        console.print(
            f"Flow overhead (fit): {fit['fixed_seconds']:.1f} s fixed + {fit['per_concept_seconds']:.2f} s per concept; under 15 % "
            f"of the library's time " + (f"from N = {fit['under_15_percent_from_n']}" if fit["under_15_percent_from_n"] else
            "at no large N (its cost per concept is over 15 % of the library's)") + ". Prefect's temporary server: "
            f"{report['prefect_startup_seconds']:.1f} s, once per process."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated concept counts (default 1,4,16,64; --tiny: 1,2)")
    parser.add_argument("--workers", default="1,2", help="flow rows' worker counts")
    parser.add_argument("--evaluate-up-to", type=int, default=16, help="evaluate every row up to this N; above, the 1-worker flow only")
    parser.add_argument("--tiny", action="store_true", help="builtin:tiny with a few steps: checks the script end to end")
    parser.add_argument("--json", help="write the report here too")
    parser.add_argument("--table-from", help="print the table of an earlier run's JSON and stop")
    parser.add_argument("--markdown", action="store_true", help="with --table-from: print Markdown (the README's table)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (stores, models, MLflow database)")
    args = parser.parse_args()
    if args.table_from:
        report = json.loads(Path(args.table_from).read_text())
        if "1" in report["flow"]:  # the fit from the raw rows, so a fixed fit applies to earlier runs too
            report["overhead"] = overhead_fit(report["sizes"], report["library"], report["flow"]["1"])
        print_table(report, markdown=args.markdown)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return
    sizes = sorted(int(n) for n in (args.sizes or ("1,2" if args.tiny else "1,4,16,64")).split(","))
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="erasure-scale-"))
    try:
        report = run(sizes, workers, args.tiny, args.evaluate_up_to, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def run(sizes: list[int], workers: list[int], tiny: bool, evaluate_up_to: int, root: Path) -> dict:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    os.environ["ERASURE_STATE_DIR"] = str(root / "state")
    pool, preserve = concept_pool(tiny, sizes[-1])
    requests = {n: request_for(pool[:n], preserve, tiny) for n in sizes}
    model = requests[sizes[0]].model
    report = {
        "date": date.today().isoformat(), "model": model, "sizes": sizes, "workers": workers,
        "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
                   "1 torch thread per worker (2 workers, the driver and Prefect share the CPUs)",
        "library": {}, "flow": {str(w): {} for w in workers}, "memory": {},
    }
    for n in sizes:
        out = root / f"library-{n}"
        report["library"][str(n)] = library_row(requests[n], out, evaluate=n <= evaluate_up_to)
        report["memory"][str(n)] = fusion_memory(out, requests[n])
        print(f"library N={n}: {report['library'][str(n)]['wall']:.1f} s", flush=True)

    from prefect import flow

    from tasks.compute import drop_pools, ensure_ray

    @flow
    def noop() -> int:
        return 1

    timer = time.perf_counter()
    noop()
    report["prefect_startup_seconds"] = time.perf_counter() - timer
    ensure_ray()  # once per process, like Prefect's server: no row pays it
    for n in sizes:
        for w in workers:
            evaluate = n <= evaluate_up_to or w == 1
            report["flow"][str(w)][str(n)] = flow_row(requests[n], f"scale-{n}-{w}w", w, root, evaluate)
            print(f"flow N={n} {w}w: {report['flow'][str(w)][str(n)]['wall']:.1f} s", flush=True)
            if n == sizes[-1] and w == 1:  # flow_row left this row's store set: the takedown builds on it
                report["takedown"] = takedown_rows(requests[n], pool[sizes[-1]], f"scale-{n}-1w", root)
    if "1" in report["flow"]:
        report["overhead"] = overhead_fit(sizes, report["library"], report["flow"]["1"])
    drop_pools()
    return report


if __name__ == "__main__":
    main()
