"""The toy-world erasure benchmark: one table, one run, the same seeds for every method.

Retained concepts are the erased ones' neighbours (other colours; pairs that share a word),
given to every method as its prior (MACE's "retained concepts of the same domain") and
measured for acc_s. Rows (``ROWS``): the base model; MACE as the reference (CFR + LoRA +
closed-form fusion) and its two ablations (CFR only, UCE-like; LoRAs merged naively); the
constrained fusion (K+V, V only); which tokens CFR edits (MACE's tokens after the concept,
the last token, the whole span); RECE's adversarial rounds; RealEra's mining; SepME; and
All-but-One's objective. Scales: 1 shape, 1 colour, 1 style, 8 and 32 colour-shape pairs,
and 64 concepts (a colour, a shape, a style and 61 styled pairs); at 32 and 64 only the rows
that scale (``AT_SCALE``). Per-concept work is done once per distinct per-concept setting
and scale, images and masks once per concept; a row's wall time counts what a run of that
method alone would do. Beside every scale: the capacity figure (``erasure.core.capacity``), the
mean fraction of the erased states' norm outside the retained states' dominant subspace:
near 0, no linear K/V edit can separate them, whatever the method. acc_g covers trained
synonyms, paraphrases and (for compound concepts) other word orders; the unseen column the
held-out words the base model draws; uncond drift the relative change of the unconditional
prediction.

    python bench/toyworld.py --world toyworld        # the whole table on the default world
    python bench/toyworld.py --world toyworld-clip   # the CLIP world
    python bench/toyworld.py --scales colour --rows "MACE (reference)" "span + constrained"
    python bench/toyworld.py --world toyworld-mmdit  # the DiT world beside the UNet world's same rows

The joint-attention world (``toyworld-mmdit``, ``erasure.worlds.toyworld.mmdit``) is erased the
families' way (``erasure.methods.pipeline_edit``): the closed forms on ``context_embedder`` and
the pooled projection, no LoRA. Its rows (``DIT_ROWS``) run at 1 colour, 8 and 32 pairs, and the
UNet world runs the same rows beside them in the same run at ``lora_steps: 0`` (``--no-unet``: the
DiT rows alone). Its probes carry no unseen words (the ones each base model draws are measured per
world, and the DiT's are not), so its unseen column is empty; h_o does not read it. Its uncond
drift is measured on images (what both draw for the empty prompt), the UNet's on noise predictions:
the two worlds' figures are not comparable.
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

from erasure.core.capacity import capacity, concept_states  # noqa: E402
from erasure.diffusion.models import with_weights  # noqa: E402
from erasure.erase import (  # noqa: E402
    base_prior,
    cfr_only_weights,
    erase_concept,
    erased_weights,
    naive_merge_weights,
    prepare_request,
)
from erasure.evaluation.evaluate import evaluate, probes_and_judge  # noqa: E402
from erasure.evaluation.metrics import percent  # noqa: E402
from erasure.loading import load_components  # noqa: E402
from erasure.methods.fusion import fusion_prior  # noqa: E402
from erasure.spec import RequestError, parse_request  # noqa: E402
from erasure.worlds.toyworld.world import COLOURS, SHAPES, STYLES, WORLD_TEMPLATES  # noqa: E402

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

    from erasure.worlds.toyworld.judge import concept_attributes, concept_name, retained_neighbours

    attributes = [concept_attributes(c["name"]) for c in concepts]
    return [concept_name(a) for a in retained_neighbours(attributes, 32, np.random.default_rng(0))]


# Every method row: its per-concept settings (``method``) and its solve (``fusion``), each
# explicit, so a change of the request's defaults never changes a row. Rows with the same
# per-concept settings share one set of per-concept results; every objective reuses the same
# images and masks (they depend on neither). At 32 and 64 concepts only the rows that scale are
# run (the CPU budget of one run per world); ablations and per-concept variants run up to 8.
MACE_CONCEPT = {"objective": "attention", "edit_tokens": "after"}
SPAN = {"objective": "attention", "edit_tokens": "span"}
MINED = {"vocabulary_words": 8}
ROWS = [
    ("MACE (reference)", MACE_CONCEPT, {"method": "mace"}),
    ("CFR only (UCE-like)", MACE_CONCEPT, {"method": "cfr-only"}),
    ("CFR + naive LoRA merge", MACE_CONCEPT, {"method": "naive"}),
    ("constrained K+V", MACE_CONCEPT, {"method": "constrained", "output_edit": None}),
    ("constrained V only", MACE_CONCEPT, {"method": "constrained", "projections": "v", "output_edit": None}),
    ("last token + constrained", MACE_CONCEPT | {"edit_tokens": "last"}, {"method": "constrained", "output_edit": None}),
    ("span + constrained", SPAN, {"method": "constrained", "output_edit": None}),
    ("span + constrained V only", SPAN, {"method": "constrained", "projections": "v", "output_edit": None}),
    ("span + constrained, threshold 1e-4", SPAN, {"method": "constrained", "threshold": 1e-4, "output_edit": None}),
    ("span + constrained + RECE x2", SPAN, {"method": "constrained", "adversarial_rounds": 2, "output_edit": None}),
    ("span + mining + constrained", SPAN | {"mining": MINED}, {"method": "constrained", "output_edit": None}),
    ("span + mining + constrained + RECE x2", SPAN | {"mining": MINED}, {"method": "constrained", "adversarial_rounds": 2, "output_edit": None}),
    ("SepME", {"objective": "separable", "edit_tokens": "after"}, {"method": "separable"}),
    ("All-but-One + MACE fusion", {"objective": "alternative", "edit_tokens": "after", "lora_lr": 1e-3}, {"method": "mace"}),
    ("All-but-One + span + constrained", {"objective": "alternative", "edit_tokens": "span", "lora_lr": 1e-3},
     {"method": "constrained", "output_edit": None}),
    # generality: the names the model draws the concept by, and what attacks find (judged by the world's judge)
    ("span + constrained + output edit 0.9", SPAN, {"method": "constrained", "output_edit": 0.9}),
    ("span + constrained + discovery", SPAN | {"discovery": {}}, {"method": "constrained", "output_edit": None}),
    ("span + constrained + output edit 0.9 + discovery", SPAN | {"discovery": {}}, {"method": "constrained", "output_edit": 0.9}),
    ("span + constrained + output edit 0.9 + discovery + closure", SPAN | {"discovery": {}},
     {"method": "constrained", "output_edit": 0.9, "closure": {}}),
]
AT_SCALE = {
    "32 pairs": {"MACE (reference)", "constrained K+V", "span + constrained", "span + constrained V only",
                 "span + constrained + output edit 0.9",
                 "span + constrained, threshold 1e-4",
                 "span + constrained + RECE x2", "span + mining + constrained", "span + mining + constrained + RECE x2", "SepME"},
    "64 mixed": {"MACE (reference)", "constrained K+V", "span + constrained", "span + constrained, threshold 1e-4",
                 "span + constrained + output edit 0.9",
                 "span + mining + constrained",
                 "span + mining + constrained + RECE x2", "SepME"},
}


def run_scale(
    label: str, concepts: list[dict], method: dict, preserve: dict, device: str, model: str, only: list[str] | None = None,
    rows_run: list[tuple[str, dict, dict]] | None = None,
) -> list[dict]:
    """The rows ``ROWS`` (``AT_SCALE`` applied), or exactly ``rows_run`` when given, on one UNet world."""
    preserve = preserve | {"concepts": retained(concepts)}
    make = lambda m, f: parse_request(  # noqa: E731
        {"model": model, "concepts": concepts, "method": method | m, "preserve": preserve, "seed": 0, "fusion": f}
    )
    base = load_components(model, device)
    request = prepare_request(make(MACE_CONCEPT, {"method": "mace"}), base)
    room = capacity(
        concept_states(base, [c.name for c in request.concepts], WORLD_TEMPLATES),
        concept_states(base, list(request.preserve.concepts), WORLD_TEMPLATES),
    )
    timer = time.perf_counter()
    prior = base_prior(base, request.preserve, request.fusion)
    t_prior = time.perf_counter() - timer
    probes, judge = probes_and_judge(request)
    steps, guidance = request.method.sampler_steps, request.method.guidance_scale
    base_eval = evaluate(base, base, probes, judge, steps, guidance)
    rows = [{
        "scale": label, "method": "base model", **base_eval.base_metrics, "seconds": 0.0,
        "unconditional_drift": 0.0, "capacity": str(room), "capacity_rho": room.rho, "capacity_rank": room.rank,
    }]
    data: dict[str, object] = {}  # concept name -> images and masks, drawn once
    data_seconds: dict[str, float] = {}
    groups: dict[str, tuple[list, float]] = {}  # per-concept settings -> (results, seconds)
    for name, per_concept, fusion in rows_run or ROWS:
        if rows_run is None and ((only and name not in only) or (label in AT_SCALE and name not in AT_SCALE[label])):
            continue
        key = json.dumps(per_concept, sort_keys=True)
        row_request = make(per_concept, fusion if fusion["method"] in ("mace", "constrained", "separable") else {})
        row_request = prepare_request(row_request, base)
        if key not in groups:
            results = []
            for concept in row_request.concepts:
                fresh = concept.name not in data
                result = erase_concept(base, concept, row_request, prior, data=data.get(concept.name))
                if fresh:
                    data[concept.name] = result.data
                    data_seconds[concept.name] = result.seconds["data"]
                results.append(result)
            # what a run of this method alone would take: its own discovery, text and training, and the images
            seconds = sum(r.seconds["discovery"] + r.seconds["text"] + r.seconds["lora"] + data_seconds[r.concept.name] for r in results)
            groups[key] = (results, seconds)
        results, t_concepts = groups[key]
        timer = time.perf_counter()
        try:
            if fusion["method"] == "cfr-only":
                weights = cfr_only_weights(base, results, fusion_prior(prior, results), row_request.preserve.lam1, row_request.preserve.ridge)
            elif fusion["method"] == "naive":
                weights = naive_merge_weights(base, results, fusion_prior(prior, results), row_request.preserve.lam1, row_request.preserve.ridge)
            else:  # closure, when the row asks for it, attacks the fused model and fuses again
                weights, _ = erased_weights(base, results, prior, row_request)
        except RequestError as error:  # a method's own limit (SepME's capacity): a row that says so
            rows.append({"scale": label, "method": name, "seconds": float("nan"), "capacity": "", "error": str(error)})
            print(f"  {label} / {name}: {error}", flush=True)
            continue
        t_fusion = time.perf_counter() - timer
        variant = with_weights(base, weights)
        result = evaluate(variant, base, probes, judge, steps, guidance, base_images=base_eval.base_images)
        rows.append({
            "scale": label, "method": name, **result.metrics, "seconds": t_prior + t_concepts + t_fusion,
            "fusion_seconds": t_fusion, "capacity": "",
        })
        print(f"  {label} / {name}: " + " ".join(f"{k} {percent(result.metrics[k])}" for k in ("acc_e", "acc_g", "acc_s", "h_o")), flush=True)
    return rows


# The DiT world's rows, closed form (no LoRA), each a ``ROWS`` entry's per-concept settings and fusion;
# the UNet world runs the same entries beside them in the same run with ``lora_steps: 0``, so a
# difference between the two is the architecture's, not the method's.
DIT_ROWS = [
    ("MACE fusion (closed form)", MACE_CONCEPT, {"method": "mace"}),
    ("span + constrained", SPAN, {"method": "constrained", "output_edit": None}),
    ("span + constrained + output edit 0.9", SPAN, {"method": "constrained", "output_edit": 0.9}),
]
DIT_SCALES = ("colour", "8 pairs", "32 pairs")


def run_dit_scale(label: str, concepts: list[dict], method: dict, preserve: dict, folder: str | None = None) -> list[dict]:
    """The DiT world's rows at one scale, through the families' stage functions: one prior, each
    concept's statistics once per per-concept setting."""
    from erasure.architectures.base import LoadedPipeline
    from erasure.erase_pipeline import fused_pipeline, pipeline_concept, pipeline_prior
    from erasure.worlds.toyworld.judge import ToyJudge, erasure_probes
    from erasure.worlds.toyworld.mmdit import load_mmdit_world
    from erasure.worlds.toyworld.model import load_toyworld_classifier

    base = load_mmdit_world(folder)
    steps, guidance = base.sampler_defaults()
    make = lambda m, f: parse_request({  # noqa: E731  the toy world's request; the model key is only validated (the DiT is loaded above)
        "model": "builtin:toyworld", "concepts": concepts, "seed": 0, "fusion": f,
        "method": method | m | {"lora_steps": 0}, "preserve": preserve | {"concepts": retained(concepts)},
    })
    request = make(MACE_CONCEPT, {"method": "mace"})
    probes = erasure_probes([c.name for c in request.concepts], list(request.preserve.concepts), seed=request.seed)
    judge = ToyJudge(load_toyworld_classifier())
    base_eval = evaluate(base, base, probes, judge, steps, guidance)
    rows = [{"scale": label, "world": "DiT", "method": "base model", **base_eval.base_metrics, "seconds": 0.0,
             "unconditional_drift": 0.0, "capacity": ""}]
    timer = time.perf_counter()
    prior = pipeline_prior(base, request.preserve)
    t_prior = time.perf_counter() - timer
    statistics: dict[str, tuple[list, float]] = {}
    for name, per_concept, fusion in DIT_ROWS:
        row_request = make(per_concept, fusion)
        key = json.dumps(per_concept, sort_keys=True)
        if key not in statistics:
            timer = time.perf_counter()
            made = [pipeline_concept(base, row_request.model_copy(update={"concepts": (c,)}), prior) for c in row_request.concepts]
            statistics[key] = (made, time.perf_counter() - timer)
        made, t_concepts = statistics[key]
        timer = time.perf_counter()
        try:
            erased = LoadedPipeline(fused_pipeline(base, row_request.preserve, row_request.fusion, prior, made), base.architecture)
        except RequestError as error:
            rows.append({"scale": label, "world": "DiT", "method": name, "seconds": float("nan"), "capacity": "", "error": str(error)})
            print(f"  DiT {label} / {name}: {error}", flush=True)
            continue
        t_fusion = time.perf_counter() - timer
        result = evaluate(erased, base, probes, judge, steps, guidance, base_images=base_eval.base_images)
        rows.append({"scale": label, "world": "DiT", "method": name, **result.metrics,
                     "seconds": t_prior + t_concepts + t_fusion, "fusion_seconds": t_fusion, "capacity": ""})
        print(f"  DiT {label} / {name}: " + " ".join(f"{k} {percent(result.metrics[k])}" for k in ("acc_e", "acc_g", "acc_s", "h_o")), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="toyworld", choices=["toyworld", "toyworld-clip", "toyworld-mmdit"])
    parser.add_argument("--no-unet", action="store_true", help="toyworld-mmdit: without the UNet world's rows beside")
    parser.add_argument("--dit-model", help="toyworld-mmdit: a trained MMDiT folder instead of erasure/assets/toyworld-mmdit/model")
    parser.add_argument("--scales", nargs="*", choices=list(SCALES), help="default: every scale (toyworld-mmdit: DIT_SCALES)")
    parser.add_argument("--rows", nargs="*", choices=[name for name, _, _ in ROWS], help="only these methods")
    parser.add_argument("--lora-steps", type=int, default=50)
    parser.add_argument("--lora-lr", type=float, default=1e-4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--lam1", type=float, default=5.0)
    parser.add_argument("--lam2", type=float, default=5.0)
    parser.add_argument("--json", help="also write the rows to this file (after every scale)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    method = {"lora_steps": args.lora_steps, "lora_lr": args.lora_lr, "images_per_concept": args.images}
    preserve = {"lam1": args.lam1, "lam2": args.lam2}
    rows = []
    dit = args.world == "toyworld-mmdit"
    scales = args.scales or list(DIT_SCALES if dit else SCALES)
    if dit and (args.rows or set(scales) - set(DIT_SCALES)):
        parser.error(f"--world toyworld-mmdit runs the rows DIT_ROWS at the scales {', '.join(DIT_SCALES)}; drop --rows")
    for label in scales:
        if dit:
            rows.extend(run_dit_scale(label, SCALES[label], method, preserve, args.dit_model))
            if not args.no_unet:  # the same rows on the UNet world, closed form as the DiT's
                beside = run_scale(label, SCALES[label], method | {"lora_steps": 0}, preserve, "cpu", "builtin:toyworld",
                                   rows_run=DIT_ROWS)
                rows.extend(r | {"world": "UNet (lora_steps 0)"} for r in beside)
        else:
            rows.extend(run_scale(label, SCALES[label], method, preserve, "cpu", f"builtin:{args.world}", args.rows))
        print(f"done: {label}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
    table = Table(
        title=f"{args.world} erasure benchmark (%; lora {args.lora_steps} steps lr {args.lora_lr}"
        + (" on the UNet rows, none on the DiT's" if dit else "") + f", lam1 {args.lam1}, lam2 {args.lam2})"
    )
    columns = ("acc_e ↓", "acc_g ↓", "phrasing ↓", "unseen ↓", "acc_s ↑", "h_o ↑", "uncond drift", "wall s", "capacity / note")
    for column in ("scale", "method", *columns):
        table.add_column(column)
    for row in rows:
        label = f"{row['world']}: {row['method']}" if "world" in row else row["method"]
        if "error" in row:
            table.add_row(row["scale"], label, *["–"] * 8, row["error"][:60])
            continue
        table.add_row(
            row["scale"], label,
            *(percent(row.get(k)) for k in ("acc_e", "acc_g", "acc_g_phrasing", "acc_g_unseen", "acc_s", "h_o")),
            f"{row.get('unconditional_drift', float('nan')):.3f}", f"{row['seconds']:.1f}", row["capacity"],
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
