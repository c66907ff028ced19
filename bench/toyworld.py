"""The toy-world erasure benchmark: one table, one run, the same seeds for every method.

Retained concepts are the erased ones' neighbours (other colours; pairs that share
a word), given to every method as its prior (MACE's "retained concepts of the same
domain") and measured for acc_s. Methods: the base model; CFR only (UCE-like); CFR + LoRAs merged naively; full
MACE (CFR + LoRA + closed-form fusion). Scales: 1 shape, 1 colour, 1 style, 8 and
32 colour-shape pairs, and 64 concepts (a colour, a shape, a style and 61 styled
pairs). Per-concept work (text statistics, images, masks, LoRAs) is done once per
scale and shared by the methods that use it; the wall time of a method counts the
stages it needs. Beside every scale: the capacity figure (``erasure.capacity``), the
mean fraction of the erased states' norm outside the retained states' dominant
subspace: near 0, no linear K/V edit can separate them, whatever the method.
acc_g is measured on trained synonyms and paraphrases, acc_g_unseen on the held-out
words the base model draws (none in a world whose encoder cannot place them).

    python bench/toyworld.py --world toyworld        # the whole table on the default world
    python bench/toyworld.py --world toyworld-clip   # the CLIP world
    python bench/toyworld.py --scales colour         # one scale
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from erasure.capacity import capacity, concept_states  # noqa: E402
from erasure.erase import (  # noqa: E402
    cfr_only_weights,
    fusion_prior,
    naive_merge_weights,
    run_stages,
    with_weights,
)
from erasure.evaluate import evaluate, probes_and_judge  # noqa: E402
from erasure.metrics import percent  # noqa: E402
from erasure.models import load_components  # noqa: E402
from erasure.spec import parse_request  # noqa: E402
from erasure.toyworld.world import COLOURS, SHAPES, STYLES, WORLD_TEMPLATES  # noqa: E402

ANCHOR_COLOURS = ("white", "blue", "green")


def pairs(count: int, seed: int = 0) -> list[dict]:
    """``count`` colour-shape pairs drawn with a seed; each anchored to the same shape in a kept colour."""
    every = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = random.Random(seed).sample(every, count)
    erased = set(chosen)
    concepts = []
    for colour, shape in chosen:
        # the same shape in a kept colour (white first), else any kept pair
        options = [(c, shape) for c in ANCHOR_COLOURS + COLOURS] + every
        anchor = next(pair for pair in options if pair not in erased)
        concepts.append({"name": f"{colour} {shape}", "anchor": " ".join(anchor)})
    return concepts


def mix(count: int, seed: int = 0) -> list[dict]:
    """A colour, a shape and a style, then ``count - 3`` styled pairs ("striped red star") that
    name none of them; each pair anchored to the same style and shape in a kept colour."""
    singles = [{"name": "purple", "anchor": "white"}, {"name": "moon", "anchor": "circle"}, {"name": "outlined", "anchor": "solid"}]
    every = [(st, c, sh) for st in STYLES if st != "outlined" for c in COLOURS if c != "purple" for sh in SHAPES if sh != "moon"]
    chosen = random.Random(seed).sample(every, count - len(singles))
    erased = set(chosen)
    concepts = list(singles)
    for style, colour, shape in chosen:
        options = [(style, c, shape) for c in ANCHOR_COLOURS + COLOURS if c != "purple"]
        anchor = next((" ".join(t) for t in options if t not in erased), shape)  # else the bare shape
        concepts.append({"name": f"{style} {colour} {shape}", "anchor": anchor})
    return concepts


SCALES = {
    "shape": [{"name": "circle", "anchor": "square"}],
    "colour": [{"name": "red", "anchor": "white"}],
    "style": [{"name": "striped", "anchor": "solid"}],
    "8 pairs": pairs(8),
    "32 pairs": pairs(32),
    "64 mixed": mix(64),
}


def retained(concepts: list[dict]) -> list[str]:
    """The erased concepts' neighbours (other colours, pairs sharing a word): preserved and measured."""
    import numpy as np

    from erasure.toyworld.judge import concept_attributes, concept_name, retained_neighbours

    attributes = [concept_attributes(c["name"]) for c in concepts]
    return [concept_name(a) for a in retained_neighbours(attributes, 32, np.random.default_rng(0))]


def run_scale(label: str, concepts: list[dict], method: dict, preserve: dict, device: str, model: str) -> list[dict]:
    preserve = preserve | {"concepts": retained(concepts)}
    request = parse_request({"model": model, "concepts": concepts, "method": method, "preserve": preserve, "seed": 0})
    base = load_components(request.model, device)
    room = capacity(
        concept_states(base, [c.name for c in request.concepts], WORLD_TEMPLATES),
        concept_states(base, list(request.preserve.concepts), WORLD_TEMPLATES),
    )
    stages = run_stages(base, request)  # the MACE row's own stages; the baselines reuse its concepts
    request, prior, results, fused = stages.request, stages.prior, stages.concepts, stages.weights
    probes, judge = probes_and_judge(request)
    steps, guidance = request.method.sampler_steps, request.method.guidance_scale
    t_prior, t_fusion = stages.seconds["prior"], stages.seconds["fusion"]
    t_text = sum(r.seconds["text"] for r in results)
    t_rest = sum(r.seconds["data"] + r.seconds["lora"] for r in results)

    lam1, ridge = request.preserve.lam1, request.preserve.ridge
    prior_gram = fusion_prior(prior, results)
    timer = time.perf_counter()
    cfr = cfr_only_weights(base, results, prior_gram, lam1, ridge)
    t_cfr = time.perf_counter() - timer
    naive = naive_merge_weights(base, results, prior_gram, lam1, ridge)

    base_eval = evaluate(base, base, probes, judge, steps, guidance)
    rows = [{
        "scale": label, "method": "base model", **base_eval.base_metrics, "seconds": 0.0,
        "capacity": str(room), "capacity_rho": room.rho, "capacity_rank": room.rank,
    }]
    for method_name, weights, seconds in (
        ("CFR only (UCE-like)", cfr, t_prior + t_text + t_cfr),
        ("CFR + naive LoRA merge", naive, t_prior + t_text + t_cfr + t_rest),
        ("MACE (CFR + LoRA + fusion)", fused, t_prior + t_text + t_rest + t_fusion),
    ):
        variant = with_weights(base, weights)
        result = evaluate(variant, base, probes, judge, steps, guidance, base_images=base_eval.base_images)
        rows.append({"scale": label, "method": method_name, **result.metrics, "seconds": seconds, "capacity": ""})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="toyworld", choices=["toyworld", "toyworld-clip"])
    parser.add_argument("--scales", nargs="*", default=list(SCALES), choices=list(SCALES))
    parser.add_argument("--lora-steps", type=int, default=50)
    parser.add_argument("--lora-lr", type=float, default=1e-4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--lam1", type=float, default=5.0)
    parser.add_argument("--lam2", type=float, default=5.0)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    method = {"lora_steps": args.lora_steps, "lora_lr": args.lora_lr, "images_per_concept": args.images}
    preserve = {"lam1": args.lam1, "lam2": args.lam2}
    rows = []
    for label in args.scales:
        rows.extend(run_scale(label, SCALES[label], method, preserve, "cpu", f"builtin:{args.world}"))
        print(f"done: {label}", flush=True)
    table = Table(
        title=f"{args.world} erasure benchmark (%; lora {args.lora_steps} steps lr {args.lora_lr}, lam1 {args.lam1}, lam2 {args.lam2})"
    )
    for column in ("scale", "method", "acc_e ↓", "acc_g ↓", "acc_g unseen ↓", "acc_s ↑", "h_o ↑", "wall s", "capacity"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["scale"], row["method"],
            *(percent(row[k]) for k in ("acc_e", "acc_g", "acc_g_unseen", "acc_s", "h_o")), f"{row['seconds']:.1f}",
            row["capacity"],
        )
    Console(width=140).print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
