"""Per-concept cost at Stable Diffusion 1.x size on one GPU: seconds per stage, peak memory.

An SD-1.4-sized UNet (860M parameters) and a CLIP-L-sized text encoder (123M) built from
their configurations with random weights (nothing is downloaded; random weights cost what
trained ones cost), bf16 autocast. 10 concepts x (8 images x 30 sampler steps, 50 LoRA
steps) + CFR + fusion, then a takedown of one more concept (its stages and one fusion).
Printed: seconds per concept per stage, peak GPU memory, the fusion's memory with the
statistics of 10 and 100 concepts (sufficient statistics: it must not grow), and the seconds
of the closed forms on the CPU in float64 at those counts (what running them on the GPU
could save).

    python bench/gpu.py            # needs a CUDA GPU; says so and stops at once without one
    python bench/gpu.py --tiny     # the same path on the CPU with the tiny test model (the test suite runs it)
    python bench/gpu.py --json gpu.json
    python bench/gpu.py --fusion-only   # the closed forms at SD-1.4 shapes on the CPU (no GPU needed)

Per family (``--family sdxl|sd35-medium|flux``, or ``all``): the closed-form path through the
family's adapter at real size (``bench/family_configs.py``), bf16 on the GPU: 10 concepts'
text statistics and CFR maps, the fusion of all 10 (a constrained solve per stream), a takedown
(one more concept, a new solve) and a restore (one fewer). Printed per family: seconds per
concept per stage, peak GPU memory, and what the eraser holds after 1 and after 10 concepts
(flat without restore: sufficient statistics; with restore each concept's own are kept). ``--tiny --family all`` runs every family's tiny pipeline
on the CPU (the test suite runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

CONCEPTS = ("cat", "dog", "car", "tree", "house", "truck", "horse", "bird", "boat", "plane", "ship")  # the last is the takedown


def sd14_components(device: str):
    """SD 1.4's UNet, VAE and text encoder shapes, random weights, a small CLIP BPE vocabulary
    (the embedding table keeps CLIP-L's 49,408 rows: the memory is the real one)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasure.core.prompts import template_words
    from erasure.core.tokenizer import build_clip_tokenizer
    from erasure.diffusion.models import TINY_EXTRA_WORDS, Components

    tokenizer = build_clip_tokenizer(template_words() + TINY_EXTRA_WORDS, model_max_length=77)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return Components(unet, encoder, tokenizer, scheduler, vae).to(device).eval()


def fusion_memory(components, concepts: int) -> int:
    """Bytes the fusion holds with ``concepts`` concepts' statistics (synthetic, the right shapes)."""
    from erasure.core.attention import cross_attention_projections
    from erasure.core.closed_form import DTYPE, ConceptStatistics, FusionAccumulator

    projections = cross_attention_projections(components.unet)
    dim = components.text_encoder.config.hidden_size
    accumulator = FusionAccumulator(dim, {n: tuple(p.weight.shape) for n, p in projections.items()})
    eye = torch.eye(dim, dtype=DTYPE)
    stats = ConceptStatistics(eye, eye, eye, eye, 1)
    factors = {n: (torch.zeros(p.weight.shape[0], 1), torch.zeros(1, dim)) for n, p in projections.items()}
    for _ in range(concepts):  # added one at a time, as stored artifacts are read
        accumulator.add(stats, eye, factors)
    held = [accumulator.gram_sum, accumulator.mapped_gram_sum, *accumulator.lora_terms.values()]
    return sum(t.numel() * t.element_size() for t in held)


def fusion_seconds(components, concepts: int, method: str = "constrained", seed: int = 0) -> dict[str, float]:
    """Seconds of the closed forms on the CPU in float64 for ``concepts`` concepts at this model's
    shapes (synthetic statistics: random Gram matrices, rank-1 LoRA factors): adding them one at
    a time, then the solve (``method``: the default, constrained). Where the statistics live, the
    solves run: this is what moving them to the GPU could save."""
    from erasure.core.attention import cross_attention_projections
    from erasure.core.closed_form import DTYPE, ConceptStatistics, FusionAccumulator
    from erasure.methods.fusion import edited_weights, solved_weights
    from erasure.spec import FusionSettings, PreserveSpec

    generator = torch.Generator().manual_seed(seed)
    dim = components.text_encoder.config.hidden_size
    base = {n: p.weight.data.detach().cpu() for n, p in cross_attention_projections(components.unet).items()}
    fusion = FusionSettings(method=method)
    edited = edited_weights(base, fusion)

    def gram() -> torch.Tensor:
        states = torch.randn(4 * dim, dim, generator=generator, dtype=DTYPE)
        return states.T @ states / len(states)

    # a prior whose spectrum leaves a null space at the default threshold, as a real one does
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DTYPE))
    spectrum = torch.cat([torch.linspace(1.0, 0.01, dim - dim // 4), torch.full((dim // 4,), 1e-6)]).to(DTYPE)
    prior_gram = basis @ torch.diag(spectrum) @ basis.T
    # the empty prompt's states (held exactly) are in the prior, as a real prior's are: in its used directions
    used = dim - dim // 4
    invariants = (basis[:, :used] @ torch.randn(used, components.tokenizer.model_max_length, generator=generator, dtype=DTYPE)).T
    # one synthetic concept, added ``concepts`` times: the arithmetic of adding any concept
    g = gram()
    stats = ConceptStatistics(g, g, g, g, 1)
    text_map = torch.eye(dim, dtype=DTYPE) + 0.01 * torch.randn(dim, dim, generator=generator, dtype=DTYPE)
    factors = {n: (torch.randn(w.shape[0], 1, generator=generator), torch.randn(1, dim, generator=generator)) for n, w in edited.items()}
    timer = time.perf_counter()
    accumulator = FusionAccumulator(dim, {n: tuple(w.shape) for n, w in edited.items()})
    for _ in range(concepts):
        accumulator.add(stats, text_map, factors)
    accumulate = time.perf_counter() - timer
    timer = time.perf_counter()
    solved_weights(invariants, accumulator, edited, prior_gram, PreserveSpec(), fusion)
    return {"accumulate": round(accumulate, 3), "solve": round(time.perf_counter() - timer, 3)}


def run(tiny: bool, json_path: str | None) -> dict:
    from erasure.diffusion.models import build_tiny_components
    from erasure.erase import base_prior, erase_concept, prepare_request
    from erasure.methods.fusion import fuse
    from erasure.spec import parse_request

    if tiny:
        device, count, method = "cpu", 2, {"images_per_concept": 2, "sampler_steps": 3, "lora_steps": 3, "prompts_per_concept": 4}
        components = build_tiny_components().eval()
        fusion = {"method": "mace"}  # the tiny model's random 32-wide encoder leaves no null space to constrain to
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu.py needs a CUDA GPU (none is visible to torch); run it with --tiny to check it on the CPU")
        device, count, method = "cuda", 10, {"images_per_concept": 8, "sampler_steps": 30, "lora_steps": 50}
        components = sd14_components(device)
        fusion = {}
        torch.cuda.reset_peak_memory_stats()
    names = CONCEPTS[:count] + CONCEPTS[-1:]
    request = parse_request({
        "model": "builtin:tiny", "concepts": [{"name": n, "anchor": "church"} for n in names[:-1]],
        "method": method, "fusion": fusion, "seed": 0,
    })
    request = prepare_request(request, components)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    with autocast:
        timer = time.perf_counter()
        prior = base_prior(components, request.preserve, request.fusion)
        seconds = {"prior": time.perf_counter() - timer}
        results = []
        for concept in request.concepts:
            results.append(erase_concept(components, concept, request, prior))
            sync()
        timer = time.perf_counter()
        fuse(components, results, prior, request.preserve, request.fusion)
        sync()
        seconds["fusion"] = time.perf_counter() - timer
        new = parse_request({"model": "builtin:tiny", "concepts": [{"name": names[-1], "anchor": "church"}],
                             "method": method, "fusion": fusion, "seed": 0}).concepts[0]
        timer = time.perf_counter()
        added = erase_concept(components, new, request, prior)
        fuse(components, [*results, added], prior, request.preserve, request.fusion)
        sync()
        seconds["takedown"] = time.perf_counter() - timer

    per_stage = {stage: sum(r.seconds[stage] for r in results) / len(results) for stage in ("text", "data", "lora")}
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (--tiny)",
        "concepts": len(results),
        "seconds_per_concept": {k: round(v, 3) for k, v in per_stage.items()} | {"total": round(sum(per_stage.values()), 3)},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "fusion_memory_mib": {n: round(fusion_memory(components, n) / 2**20, 2) for n in (10, 100)},
        "fusion_cpu_float64_seconds": {n: fusion_seconds(components, n, fusion.get("method", "constrained")) for n in (10, 100)},
    }
    print(f"{report['device']}: {report['concepts']} concepts")
    print("seconds per concept: " + ", ".join(f"{k} {v}" for k, v in report["seconds_per_concept"].items()))
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    print(f"peak GPU memory: {report['peak_gpu_memory_gib']} GiB")
    print("fusion memory (MiB) at 10 / 100 concepts: " + " / ".join(str(v) for v in report["fusion_memory_mib"].values()))
    print("closed forms on the CPU, float64 (accumulate + solve, s) at 10 / 100 concepts: " + " / ".join(
        f"{v['accumulate']} + {v['solve']}" for v in report["fusion_cpu_float64_seconds"].values()))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def run_family(family: str, tiny: bool) -> dict:
    """The closed-form path of one family (module docstring); ``tiny``: its tiny pipeline on the CPU."""
    from erasure.architectures.registry import architecture_of
    from erasure.architectures.tiny import build_tiny_pipeline
    from erasure.erase_pipeline import conditioning_rows
    from erasure.methods.pipeline_edit import PipelineEraser
    from erasure.spec import ConceptSpec, FusionSettings

    if tiny:
        device, count, prompts, retained = "cpu", 2, 4, ["", "a photo of a dog"]
        pipe = build_tiny_pipeline({"sd35-medium": "sd3"}.get(family, family))
        fusion = FusionSettings(method="mace")  # the tiny encoders leave the default constrained fusion little room
    else:
        from bench.family_configs import real_size_pipeline

        device, count, prompts, retained = "cuda", 10, 30, ["", *(f"a photo of a {w}" for w in ("dog", "tree", "house", "chair"))]
        torch.cuda.reset_peak_memory_stats()
        pipe = real_size_pipeline(family)
        fusion = FusionSettings()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    architecture = architecture_of(pipe)
    concepts = [ConceptSpec(name=n, anchor="church") for n in CONCEPTS[: count + 1]]
    timer = time.perf_counter()
    eraser = PipelineEraser(pipe, architecture, retained, fusion=fusion, prompts_per_concept=prompts)
    sync()
    seconds = {"prior": time.perf_counter() - timer}
    timer = time.perf_counter()
    for concept in concepts[:-1]:
        eraser.add(concept)
    sync()
    per_concept = {"text_and_cfr": (time.perf_counter() - timer) / count}
    timer = time.perf_counter()
    eraser.weights()
    seconds["fusion"] = time.perf_counter() - timer
    per_concept["fusion_share"] = seconds["fusion"] / count
    erased = eraser.erased_pipeline()
    conditioning = conditioning_rows(pipe, erased, eraser, retained)
    lora = lora_summary(pipe, erased, architecture)
    del erased
    timer = time.perf_counter()
    eraser.add(concepts[-1])
    eraser.weights()
    sync()
    seconds["takedown"] = time.perf_counter() - timer
    timer = time.perf_counter()
    eraser.remove(concepts[-1].name)
    eraser.weights()
    seconds["restore"] = time.perf_counter() - timer
    streams = architecture.streams(pipe)
    # what `erasure erase` holds (no restore): measured on a real eraser after the first and after the last concept
    held = {}
    one_shot = PipelineEraser(pipe, architecture, retained, fusion=fusion, prompts_per_concept=prompts, restorable=False)
    for index, concept in enumerate(concepts[:-1]):
        one_shot.add(concept)
        if index in (0, count - 1):
            held[index + 1] = round(one_shot.held_bytes() / 2**20, 2)
    del one_shot
    report = {
        "family": family,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (--tiny)",
        "concepts": count,
        "edited": {s.name: len(s.maps) for s in streams},
        "seconds_per_concept": {k: round(v, 3) for k, v in per_concept.items()} | {"total": round(sum(per_concept.values()), 3)},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "eraser_memory_mib": held,  # flat in the number of concepts
        "restorable_eraser_memory_mib": round(eraser.held_bytes() / 2**20, 2),  # grows: each concept's own statistics
        # the edited maps' outputs for "a photo of <concept>": distance to the anchor's, relative (mean over concepts)
        "to_anchor": {k: {s: round(sum(r[k][s] for r in conditioning) / len(conditioning), 4) for s in conditioning[0][k]}
                      for k in ("to_anchor_before", "to_anchor_after")},
        "retained_drift_max": {s: round(max(r["retained_drift"][s] for r in conditioning), 6) for s in conditioning[0]["retained_drift"]},
        "lora": lora,
    }
    print(f"{family} on {report['device']}: {count} concepts, edited {report['edited']}")
    print("  seconds per concept: " + ", ".join(f"{k} {v}" for k, v in report["seconds_per_concept"].items()))
    print("  seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    print(f"  peak GPU memory: {report['peak_gpu_memory_gib']} GiB; eraser memory (MiB) after 1 / {count} concepts: "
          + " / ".join(str(v) for v in held.values())
          + f" (with restore: {report['restorable_eraser_memory_mib']} at {count})")
    moved = ", ".join(f"{s} {report['to_anchor']['to_anchor_before'][s]:.1%} -> {report['to_anchor']['to_anchor_after'][s]:.1%}"
                      for s in report["to_anchor"]["to_anchor_before"])
    drift = ", ".join(f"{s} {v:.2%}" for s, v in report["retained_drift_max"].items())
    print(f"  conditioning to the anchor's: {moved}; retained drift at most: {drift}; LoRA at energy {LORA_ENERGY}: {lora}")
    return report


LORA_ENERGY = 0.999


def lora_summary(pipe, erased, architecture) -> dict | str:
    """The edit as a LoRA (``erasure.architectures.lora_export``): parameters, largest rank and
    relative reconstruction error."""
    import tempfile

    from erasure.architectures.lora_export import export_lora

    if not architecture.supports_lora_loading:
        return "not loadable in diffusers"
    with tempfile.TemporaryDirectory() as folder:
        maps = export_lora(pipe, erased, architecture, Path(folder) / "lora", LORA_ENERGY)
        stored = sum(f.stat().st_size for f in (Path(folder) / "lora").iterdir())
    return {"maps": len(maps), "max_rank": max(m.rank for m in maps),
            "max_relative_error": round(max(m.relative_error for m in maps), 5), "mib": round(stored / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: checks the script end to end")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--family", choices=("sdxl", "sd35-medium", "flux", "all"),
                        help="the closed-form path of this family through its adapter (all: each in turn)")
    parser.add_argument("--fusion-only", action="store_true",
                        help="only the closed forms' seconds at SD-1.4 shapes, on the CPU (no GPU needed)")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.tiny else torch.get_num_threads())
    if args.family:
        if not args.tiny and not torch.cuda.is_available():
            sys.exit("bench/gpu.py needs a CUDA GPU (none is visible to torch); run it with --tiny to check it on the CPU")
        families = ("sdxl", "sd35-medium", "flux") if args.family == "all" else (args.family,)
        reports = []
        for family in families:
            reports.append(run_family(family, args.tiny))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"date": time.strftime("%Y-%m-%d"), "families": reports}, f, indent=2)
        return
    if args.fusion_only:
        components = sd14_components("cpu")
        report = {"date": time.strftime("%Y-%m-%d"), "device": f"cpu, {torch.get_num_threads()} threads", "shapes": "SD-1.4 (d = 768, 32 K/V projections)",
                  "fusion_cpu_float64_seconds": {n: fusion_seconds(components, n) for n in (10, 100)}}
        for n, seconds in report["fusion_cpu_float64_seconds"].items():
            print(f"SD-1.4 shapes, {n} concepts, CPU float64 ({torch.get_num_threads()} threads): {seconds}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return
    run(args.tiny, args.json)


if __name__ == "__main__":
    main()
