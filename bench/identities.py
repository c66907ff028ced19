"""Mass erasure at the field's scale: 10 to 1,000 named identities erased, 100 kept (the identity world).

The field's celebrity benchmark (MACE, SPEED, OCE) erases 10, 50 and 100 celebrities and keeps
100 others, judged by a face recogniser; its metric is H_c, the harmonic mean of 1 - acc_e and
acc_s. Here the identities of ``builtin:identities`` stand in for celebrities and its classifier
for the recogniser: an image shows an identity when all five attributes of its signature are read.
Identities are drawn from those the base model draws from their names (``accuracy.json``); the
100 kept ones are fixed, and each larger erased set contains the smaller ones. An identity's alias
is given to the erasure as a synonym when it is listed, and probes generality when it is held out
(``acc_g unseen``: a nickname the operator did not know).

Rows (``ROWS``), each with the scales it runs at (``up_to``, the CPU budget of one run):

- MACE at its paper settings (CFR on the tokens after the name, a rank-1 LoRA of 50 steps per
  identity on 8 images, MACE's closed-form fusion);
- the default (the whole span, LoRA, the constrained fusion with the output edit);
- the closed form alone (no image, no LoRA: ``lora_steps: 0``), with and without the output edit;
- UCE-like (CFR only, every K/V in one solve);
- OCE-style: an orthogonal rotation of each V projection's outputs, in closed form (``erasure.methods.rotation``).

Per row: acc_e, acc_g (listed aliases), acc_g unseen (held-out aliases), acc_s, H_c; seconds per
concept (the per-concept stages a run of that row alone would do, plus its fusion) and the
fusion's peak resident memory above what was held before it.

    python bench/identities.py --json bench/results/identities.json            # every scale
    python bench/identities.py --scales 10 100 --rows "OCE-style rotation of V"
    python bench/identities.py --tiny                                           # 3 identities: checks the script
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from erasure.core.capacity import capacity, concept_states  # noqa: E402
from erasure.diffusion.models import with_weights  # noqa: E402
from erasure.erase import base_prior, cfr_only_weights, erase_concept, erased_weights, prepare_request  # noqa: E402
from erasure.evaluation.evaluate import evaluate, probes_and_judge  # noqa: E402
from erasure.evaluation.metrics import percent  # noqa: E402
from erasure.loading import load_components  # noqa: E402
from erasure.methods.fusion import fusion_prior  # noqa: E402
from erasure.methods.rotation import rotated_value_weights  # noqa: E402
from erasure.spec import parse_request  # noqa: E402
from erasure.worlds.identities.model import ACCURACY_FILE  # noqa: E402
from erasure.worlds.identities.world import WORLD_TEMPLATES, identities  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from scale import peak_rss_of  # noqa: E402

MODEL = "builtin:identities"
SCALES = (10, 50, 100, 500, 1000)
KEPT = 100
ANCHOR = "a person"
OCE_PRESERVE_WEIGHT = 1.0

MACE = {"objective": "attention", "edit_tokens": "after", "lora_steps": 50}
SPAN_LORA = {"objective": "attention", "edit_tokens": "span", "lora_steps": 50}
SPAN_CLOSED = {"objective": "attention", "edit_tokens": "span", "lora_steps": 0}
# name, per-concept settings, solve, the largest scale it runs at
ROWS = [
    ("MACE (paper settings)", MACE, {"method": "mace"}, 100),
    ("default: span + LoRA + constrained + output edit", SPAN_LORA, {"method": "constrained", "output_edit": 0.9}, 100),
    ("closed form: span + constrained + output edit", SPAN_CLOSED, {"method": "constrained", "output_edit": 0.9}, 1000),
    ("closed form: span + constrained", SPAN_CLOSED, {"method": "constrained", "output_edit": None}, 100),
    ("UCE-like (CFR only)", SPAN_CLOSED, {"method": "cfr-only"}, 1000),
    ("OCE-style rotation of V", SPAN_CLOSED, {"method": "rotation"}, 1000),
]


def drawn_names() -> set[str]:
    """The identities the committed base model draws from their name (``accuracy.json``)."""
    return set(json.loads(ACCURACY_FILE.read_text())["name"]["drawn"])


def split(largest: int, kept: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(erased pool in order, kept): identities the base model draws from their name first (as the
    field picks celebrities its model renders well), shuffled with ``seed``."""
    drawn = drawn_names()
    names = [i.name for i in identities()]
    random.Random(seed).shuffle(names)
    ordered = [n for n in names if n in drawn] + [n for n in names if n not in drawn]
    return ordered[kept:kept + largest], ordered[:kept]


def concepts_of(names: list[str]) -> list[dict]:
    by_name = {i.name: i for i in identities()}
    out = []
    for name in names:
        identity = by_name[name]
        listed = [identity.alias] if identity.alias and not identity.alias_held_out else []
        out.append({"name": name, "kind": "person", "anchor": ANCHOR, "synonyms": listed})
    return out


def _rss_mb() -> float:
    import re
    from pathlib import Path

    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def fused_weights(base, results: list, prior, request, fusion: dict) -> dict:
    """The row's solve over the per-concept ``results``."""
    if fusion["method"] == "cfr-only":
        return cfr_only_weights(base, results, fusion_prior(prior, results), request.preserve.lam1, request.preserve.ridge)
    if fusion["method"] == "rotation":
        return rotated_value_weights(base, [r.statistics for r in results], fusion_prior(prior, results), OCE_PRESERVE_WEIGHT)
    return erased_weights(base, results, prior, request)[0]


def run_scale(count: int, erased: list[str], kept: list[str], rows: list, only, method_base: dict, rows_out: list, log) -> None:
    concepts = concepts_of(erased[:count])
    make = lambda m, f: parse_request(  # noqa: E731
        {"model": MODEL, "concepts": concepts, "method": method_base | m, "preserve": {"concepts": kept}, "seed": 0, "fusion": f}
    )
    base = load_components(MODEL, "cpu")
    request = prepare_request(make(SPAN_CLOSED, {"method": "constrained"}), base)
    timer = time.perf_counter()
    prior = base_prior(base, request.preserve, request.fusion)
    t_prior = time.perf_counter() - timer
    probes, judge = probes_and_judge(request)
    steps, guidance = request.method.sampler_steps, request.method.guidance_scale
    timer = time.perf_counter()
    base_eval = evaluate(base, base, probes, judge, steps, guidance)
    log(f"{count}: {len(probes)} probes, base model drawn in {time.perf_counter() - timer:.0f} s")
    metrics = base_eval.base_metrics
    # the ceiling of any linear K/V edit: how much of the erased states lies outside the kept ones'
    # subspace, and how many of the text space's dimensions the erased states fill
    erased_states = concept_states(base, [c["name"] for c in concepts], WORLD_TEMPLATES)
    kept_states = concept_states(base, kept, WORLD_TEMPLATES)
    room = capacity(erased_states, kept_states)
    rows_out.append({
        "scale": count, "method": "base model", **metrics,
        "capacity": str(room), "capacity_rho": room.rho, "erased_rank": capacity(kept_states, erased_states).rank,
        # erased identities the base model draws from their name (the rest cost the erasure nothing)
        "erased_drawn": len(drawn_names() & set(erased[:count])),
    })
    log(f"{count}: capacity {room}, erased states' rank {rows_out[-1]['erased_rank']}/{room.width}")
    data: dict[str, object] = {}  # identity -> images and masks, drawn once for every row that trains
    data_seconds: dict[str, float] = {}
    groups: dict[str, tuple[list, float]] = {}
    for name, per_concept, fusion, up_to in rows:
        if count > up_to or (only and name not in only):
            continue
        key = json.dumps(per_concept, sort_keys=True)
        # the UCE-like and rotation rows solve outside the request (``fused_weights``): their requests
        # name a solve the spec knows, which only their per-concept stages read
        solve = fusion if fusion["method"] in ("mace", "constrained") else {"method": "constrained", "output_edit": None}
        row_request = prepare_request(make(per_concept, solve), base)
        if key not in groups:
            results, timer = [], time.perf_counter()
            for index, concept in enumerate(row_request.concepts):
                fresh = concept.name not in data
                result = erase_concept(base, concept, row_request, prior, data=data.get(concept.name))
                if fresh and result.data.images.numel():
                    data[concept.name], data_seconds[concept.name] = result.data, result.seconds["data"]
                results.append(result)
                if (index + 1) % 100 == 0:
                    log(f"  {count} / {name}: {index + 1} identities ({time.perf_counter() - timer:.0f} s)")
            # a row that trains pays for the images it reads (drawn once, for the first such row)
            draws = per_concept["lora_steps"] > 0
            seconds = sum(r.seconds["text"] + r.seconds["lora"] + (data_seconds[r.concept.name] if draws else 0.0) for r in results)
            groups[key] = (results, seconds)
        results, t_concepts = groups[key]

        weights, t_fusion, fusion_bytes = peak_rss_of(functools.partial(fused_weights, base, results, prior, row_request, fusion))
        result = evaluate(with_weights(base, weights), base, probes, judge, steps, guidance, base_images=base_eval.base_images)
        m = result.metrics
        row = {
            "scale": count, "method": name, **m,
            "seconds": t_prior + t_concepts + t_fusion, "seconds_per_concept": (t_concepts + t_fusion) / count,
            "fusion_seconds": t_fusion, "fusion_peak_mb": fusion_bytes / 2**20,
            # what the process holds after the fusion: the bench keeps every concept's statistics (about
            # 6 MB each at 384 wide) for its rows to share; a pipeline run streams them from the store
            "process_rss_mb": _rss_mb(),
        }
        rows_out.append(row)
        log(f"  {count} / {name}: acc_e {percent(m['acc_e'])} acc_g {percent(m['acc_g'])} unseen {percent(m['acc_g_unseen'])} "
            f"acc_s {percent(m['acc_s'])} H_c {percent(row['h_c'])} ({row['seconds_per_concept']:.2f} s/concept, "
            f"fusion {t_fusion:.1f} s, {row['fusion_peak_mb']:.0f} MB)")


def print_table(report: dict) -> None:
    table = Table(title=f"identity world, {report['kept']} kept ({report['date']}, {report['machine']}); %")
    for column in ("erased", "method", "acc_e ↓", "acc_g ↓", "unseen ↓", "acc_s ↑", "H_c ↑", "s / concept", "fusion s",
                   "fusion MB", "capacity"):
        table.add_column(column)
    for row in report["rows"]:
        base = row["method"] == "base model"
        table.add_row(
            str(row["scale"]), row["method"],
            *(percent(row.get(k)) for k in ("acc_e", "acc_g", "acc_g_unseen", "acc_s", "h_c")),
            *(("", "", "") if base else (f"{row['seconds_per_concept']:.2f}", f"{row['fusion_seconds']:.1f}", f"{row['fusion_peak_mb']:.0f}")),
            f"{row['capacity']}, erased rank {row['erased_rank']}; {row['erased_drawn']} erased drawn by the base" if base else "",
        )
    Console(width=170).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", nargs="+", type=int, default=list(SCALES))
    parser.add_argument("--rows", nargs="*", choices=[name for name, *_ in ROWS], help="only these methods")
    parser.add_argument("--kept", type=int, default=KEPT)
    parser.add_argument("--tiny", action="store_true", help="3 identities erased, 3 kept, 2 LoRA steps: checks the script")
    parser.add_argument("--json", help="write the report here (after every scale)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scales, kept_count, method = args.scales, args.kept, {"images_per_concept": 8}
    if args.tiny:
        scales, kept_count, method = [3], 3, {"images_per_concept": 2, "prompts_per_concept": 4}
    rows = [(name, per_concept | ({"lora_steps": 2} if args.tiny and per_concept["lora_steps"] else {}), fusion, up_to)
            for name, per_concept, fusion, up_to in ROWS]
    if max(scales) + kept_count > len(identities()):
        parser.error(f"{max(scales)} erased and {kept_count} kept: the world has {len(identities())} identities")
    erased, kept = split(max(scales), kept_count)
    report = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads",
        "model": MODEL, "kept": kept_count, "rows": [],
    }
    started = time.perf_counter()
    log = lambda line: print(f"[{time.perf_counter() - started:6.0f} s] {line}", flush=True)  # noqa: E731
    for count in scales:
        run_scale(count, erased, kept, rows, args.rows, method, report["rows"], log)
        if args.json:  # after every scale, whole: a killed run keeps the scales it finished
            with open(args.json + ".tmp", "w") as f:
                json.dump(report, f, indent=1)
            os.replace(args.json + ".tmp", args.json)
    print_table(report)


if __name__ == "__main__":
    main()
