"""``erasure erase`` for the families beyond SD 1.x/2.x (SDXL, SD3, FLUX, PixArt): the closed
form through the family's adapter (``erasure.methods.pipeline_edit``), written as the family's
own diffusers pipeline folder.

The output folder holds ``model/`` (``<PipelineClass>.from_pretrained`` reads it) and
``manifest.json``: the base fingerprint, the request, the maps edited per stream, and per
concept how far its conditioning moved toward its anchor's and how far the retained prompts'
moved (measured on the edited maps' outputs, what the denoiser reads). It is published whole or
not at all, like the UNet path's. It holds no per-concept artifacts: takedown and restore of
such a model are the distributed flows' (``erasure run``), whose workers publish the prior and
each concept on their own with the stage functions at the end of this module, and fuse what
is published (``tasks.worker``); in one process, ``PipelineEraser``'s ``add`` and ``remove``
are exact without encoding anything again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from erasure.architectures.base import LoadedPipeline, read_weight
from erasure.architectures.registry import save_pipeline
from erasure.core.closed_form import PriorStatistics
from erasure.core.prompts import fill
from erasure.diffusion.models import fingerprint, pipeline_fingerprint
from erasure.erase import (
    MANIFEST_FILE,
    check_output_folder,
    concept_seed,
    manifest_head,
    prior_prompts,
    publish_erasure,
    retained_prompts,
    with_model_sampling,
)
from erasure.loading import load_components, load_model, pipeline_family
from erasure.methods.fusion import editable_projector
from erasure.methods.pipeline_edit import ErasedConcept, PipelineEraser, concept_streams, stream_priors
from erasure.spec import (
    ErasureRequest,
    FusionSettings,
    PreserveSpec,
    RequestError,
    check_concepts_against_tokenizer,
)

PROBE_TEMPLATE = "a photo of {}"  # the conditioning measure's prompt


def erase_manifest(erase_output: Path) -> dict | None:
    """The manifest of an erase output, given the output folder or its ``model/``; None without one."""
    erase_output = Path(erase_output)
    for folder in (erase_output, erase_output.parent):
        if (folder / MANIFEST_FILE).is_file():
            return json.loads((folder / MANIFEST_FILE).read_text())
    return None


def erasure_dtype(erase_output: Path) -> str:
    """The dtype an erase output was made in (its base was fingerprinted in it), float32 when unsaid."""
    return (erase_manifest(erase_output) or {}).get("dtype", "float32")


def check_erased_from(base: Path, base_pipe, erase_output: Path) -> None:
    """Refuse an erase output whose manifest names another base than ``base``: each path fingerprints
    its base its own way (this one the whole pipeline, the UNet path its ``Components``). A folder
    without a manifest (a model saved by hand) is taken as it is."""
    manifest = erase_manifest(erase_output)  # given OUT/model, the output's manifest is beside it
    if manifest is None:
        return
    made_from = manifest.get("base_fingerprint")
    if made_from is None:
        return
    if "family" in manifest:
        actual = pipeline_fingerprint(base_pipe)
    else:
        actual = fingerprint(load_components(str(base)))
    if made_from != actual:
        raise RequestError(f"{erase_output} was erased from another model than {base} (base fingerprints differ)")


def check_supported(request: ErasureRequest, pipeline_class: str) -> None:
    """Refuse what this path does not do, saying what to set: it is the closed form alone."""
    method, fusion = request.method, request.fusion
    unsupported = [
        (method.lora_steps != 0, "method.lora_steps: 0 (LoRA training and its masks are built for SD 1.x/2.x UNets)"),
        (method.objective != "attention", "method.objective: attention"),
        (method.mining is not None, "no method.mining (neighbour mining reads a CLIP-style vocabulary table)"),
        (method.discovery is not None, "no method.discovery (alias discovery samples through the UNet path)"),
        (fusion.method == "separable", "fusion.method: mace or constrained"),
        (fusion.adversarial_rounds != 0, "fusion.adversarial_rounds: 0"),
        (fusion.closure is not None, "no fusion.closure"),
        (fusion.projections != "kv", "fusion.projections: kv (shared and pooled projections are not split in K and V)"),
    ]
    needed = [fix for broken, fix in unsupported if broken]
    if needed:
        raise RequestError(
            f"{pipeline_class} is erased with the closed form alone (its text streams' K/V or shared projection); "
            f"set {'; '.join(needed)}"
        )


def conditioning(pipe, eraser: PipelineEraser, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per stream, what every edited map of ``pipe``'s denoiser gives ``states``, side by side."""
    denoiser = eraser.architecture.denoiser(pipe)
    return {
        name: torch.cat([states[name] @ read_weight(denoiser, edited).float().T for edited in stream.maps], dim=-1)
        for name, stream in eraser.streams.items()
    }


def conditioning_rows(base, erased, eraser: PipelineEraser, retained: list[str]) -> list[dict]:
    """Per concept and stream: the distance of its probe prompt's conditioning to its anchor's,
    relative to the anchor's norm, in the base and in the erased model; and the largest relative
    change of a retained prompt's conditioning (None without retained prompts). Each stream on
    its own: the pooled state is one vector against the token stream's hundreds. The two models
    share their text encoders: every prompt is encoded once."""
    concepts = [c.concept for c in eraser.concepts.values()]
    prompts = [fill(PROBE_TEMPLATE, text) for c in concepts for text in (c.name, c.anchor)]
    states = eraser.architecture.states(base, prompts + retained)
    before, after = conditioning(base, eraser, states), conditioning(erased, eraser, states)
    kept = len(prompts)
    rows = []
    for index, erased_concept in enumerate(eraser.concepts.values()):
        concept = erased_concept.concept
        row = {"name": concept.name, "kind": concept.kind, "anchor": concept.anchor, "pairs": len(erased_concept.pairs),
               "to_anchor_before": {}, "to_anchor_after": {}, "retained_drift": {} if retained else None}
        for stream in before:
            b, a = _flat(before[stream]), _flat(after[stream])
            probe, anchor = 2 * index, 2 * index + 1
            scale = b[anchor].norm()
            row["to_anchor_before"][stream] = float((b[probe] - b[anchor]).norm() / scale)
            row["to_anchor_after"][stream] = float((a[probe] - b[anchor]).norm() / scale)
            if retained:
                moved = (a[kept:] - b[kept:]).norm(dim=1) / b[kept:].norm(dim=1).clamp_min(1e-12)
                row["retained_drift"][stream] = float(moved.max())
        rows.append(row)
    return rows


def _flat(states: torch.Tensor) -> torch.Tensor:
    return states.reshape(states.shape[0], -1)


def erase_pipeline(
    request: ErasureRequest, out_dir: Path, device: str = "cpu", overwrite: bool = False, dtype: str = "float32"
) -> dict:
    """Erase ``request``'s concepts from the pipeline folder it names, loaded in ``dtype`` (the closed
    forms solve in float64 all the same); returns the manifest."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    seconds, started = {}, time.perf_counter()
    check_supported(request, pipeline_family(request.model) or "this pipeline")  # before a 12 B-parameter load
    model = load_model(request.model, "cpu", dtype)
    if not isinstance(model, LoadedPipeline):
        raise RequestError(f"{request.model} is not an SDXL, SD 3, FLUX or PixArt pipeline: `erasure erase` takes it the UNet path's way")
    pipe, architecture = model.pipe, model.architecture
    check_pipeline_concepts(model, request.concepts)
    pipe.to(device)
    base_fingerprint = pipeline_fingerprint(pipe)
    seconds["load"] = time.perf_counter() - started

    timer = time.perf_counter()
    eraser = PipelineEraser(  # one solve, no restore: nothing per concept is held past its addition
        pipe, architecture, prior_prompts(request.preserve), request.preserve, request.fusion,
        request.method.prompts_per_concept, request.method.edit_tokens, restorable=False,
    )
    seconds["prior"] = time.perf_counter() - timer
    timer = time.perf_counter()
    for concept in request.concepts:
        eraser.add(concept, concept_seed(request.seed, concept))
    seconds["concepts"] = time.perf_counter() - timer
    timer = time.perf_counter()
    erased = checked_erased_pipeline(eraser, dtype)
    seconds["fusion"] = time.perf_counter() - timer
    rows = conditioning_rows(pipe, erased, eraser, [fill(PROBE_TEMPLATE, c) for c in request.preserve.concepts[:8]])

    timer = time.perf_counter()

    def write(staging: Path) -> dict:
        save_pipeline(erased, staging / "model")
        seconds["write"] = time.perf_counter() - timer
        seconds["total"] = time.perf_counter() - started
        return manifest_head(request, base_fingerprint) | {
            "family": architecture.family,
            "pipeline_class": type(pipe).__name__,
            "dtype": dtype,
            "text_settings": architecture.text_settings(pipe),
            "edited": {name: [m.module for m in stream.maps] for name, stream in eraser.streams.items()},
            "concepts": rows,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }

    return publish_erasure(out_dir, overwrite, write)


# The stages of a distributed run (``tasks.worker``), each a piece of ``erase_pipeline``: the prior
# and every concept are published on their own, and the fusion reads them back.


def check_pipeline_concepts(model: LoadedPipeline, concepts, first_index: int = 0) -> None:
    """Refuse a concept that one of the pipeline's tokenizers reads as nothing (or ``<unk>``), on
    the text it tokenizes (PixArt lower-cases and cleans it first)."""
    pipe, architecture = model.pipe, model.architecture
    for stream in architecture.streams(pipe):
        for segment in stream.segments:
            check_concepts_against_tokenizer(
                concepts, getattr(pipe, segment.tokenizer), first_index,
                preprocess=lambda text: architecture.tokenized_text(pipe, [text])[0],
            )


def prepare_pipeline_request(
    request: ErasureRequest, model: LoadedPipeline, first_index: int = 0, erasing: bool = True
) -> ErasureRequest:
    """``erasure.erase.prepare_request`` for a family's pipeline: what this path cannot do refused
    (when ``erasing``: an audit's request is only read for its concepts), the concepts checked
    against every tokenizer, the class's sampler defaults filled in."""
    if erasing:
        check_supported(request, type(model.pipe).__name__)
    check_pipeline_concepts(model, request.concepts, first_index)
    return with_model_sampling(request, model)


def pipeline_prior(model: LoadedPipeline, preserve: PreserveSpec) -> dict[str, PriorStatistics]:
    """Per stream, the base prior's statistics (``erasure.erase.prior_prompts``' prompts)."""
    return stream_priors(model.pipe, model.architecture, prior_prompts(preserve))


def pipeline_prior_without(
    model: LoadedPipeline, prior: dict[str, PriorStatistics], made_from: tuple[str, ...], names: tuple[str, ...]
) -> dict[str, PriorStatistics]:
    """``prior`` less the states of retained concepts ``names`` in every stream (a takedown of a
    concept the prior kept; ``erasure.erase.without_retained``): exact, nothing else encoded."""
    gone = stream_priors(model.pipe, model.architecture, retained_prompts(made_from, names))
    return {name: PriorStatistics(p.total - gone[name].total, p.count - gone[name].count) for name, p in prior.items()}


def check_room_to_edit(model: LoadedPipeline, prior: dict[str, PriorStatistics], fusion: FusionSettings) -> None:
    """The constrained fusion needs directions the retained states leave free: refused with the
    prior, before any concept's work, as on the UNet path."""
    if fusion.method != "constrained":
        return
    for name, states in model.architecture.unconditional_states(model.pipe).items():
        editable_projector(states.reshape(-1, states.shape[-1]).double(), prior[name].gram(), fusion)


def pipeline_concept(model: LoadedPipeline, request: ErasureRequest, prior: dict[str, PriorStatistics]) -> ErasedConcept:
    """The statistics of a one-concept request's concept in every stream, against ``prior``."""
    concept, method = request.concepts[0], request.method
    return concept_streams(model.pipe, model.architecture, concept, prior, request.preserve, method.prompts_per_concept,
                           method.edit_tokens, concept_seed(request.seed, concept))


def fused_pipeline(
    model: LoadedPipeline, preserve: PreserveSpec, fusion: FusionSettings, prior: dict[str, PriorStatistics],
    concepts: Iterable[ErasedConcept], dtype: str = "float32",
):
    """The erased pipeline of ``concepts`` (read one at a time: memory stays flat in their number)."""
    # the fusion reads no prompt settings: the eraser's own defaults stand
    eraser = PipelineEraser(model.pipe, model.architecture, [], preserve, fusion, restorable=False, prior=prior)
    for concept in concepts:
        eraser.include(concept)
    return checked_erased_pipeline(eraser, dtype)


def checked_erased_pipeline(eraser: PipelineEraser, dtype: str):
    """The eraser's pipeline, refused when a solve gave a non-finite weight: nothing broken is published."""
    erased = eraser.erased_pipeline()
    for stream in eraser.streams.values():
        for edited in stream.maps:
            if not torch.isfinite(read_weight(eraser.architecture.denoiser(erased), edited)).all():
                raise RequestError(
                    f"the closed-form solve gave NaN or infinite weights in {edited.module}: the statistics are "
                    f"degenerate in {dtype}; load the model in float32"
                )
    return erased
