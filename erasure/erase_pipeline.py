"""``erasure erase`` for the families beyond SD 1.x/2.x (SDXL, SD3, FLUX, PixArt): the closed
form through the family's adapter (``erasure.methods.pipeline_edit``), written as the family's
own diffusers pipeline folder.

The output folder holds ``model/`` (``<PipelineClass>.from_pretrained`` reads it) and
``manifest.json``: the base fingerprint, the request, the maps edited per stream, and per
concept how far its conditioning moved toward its anchor's and how far the retained prompts'
moved (measured on the edited maps' outputs, what the denoiser reads). It is published whole or
not at all, like the UNet path's. It holds no per-concept artifacts: a later takedown or restore
of such a model is a new ``erasure erase`` of the new set (in one process, ``PipelineEraser``'s
``add`` and ``remove`` are exact without encoding anything again).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from erasure.architectures.base import read_weight
from erasure.architectures.registry import PIPELINE_FAMILIES, load_pipeline, quiet_progress
from erasure.core.prompts import fill
from erasure.diffusion.models import allowed_revision, check_finite, fingerprint, pipeline_fingerprint
from erasure.erase import (
    MANIFEST_FILE,
    check_output_folder,
    concept_seed,
    manifest_head,
    prior_prompts,
    publish_erasure,
)
from erasure.loading import load_components
from erasure.methods.pipeline_edit import PipelineEraser
from erasure.spec import BUILTIN_PREFIX, ErasureRequest, RequestError, check_concepts_against_tokenizer

PROBE_TEMPLATE = "a photo of {}"  # the conditioning measure's prompt


def pipeline_family(model: str) -> str | None:
    """The pipeline class a local folder's ``model_index.json`` names when this path handles it
    (``PIPELINE_FAMILIES``); for a hub id, the one its ``model_index.json`` names at the revision
    the worker's allow-list pins (fetched, or read from the cache offline). None for anything
    else (the UNet path's models, built-ins, a hub id that cannot be read)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        index = folder / "model_index.json"
    elif _is_hub_id(model):
        index = _hub_file(model, "model_index.json")
    else:
        return None
    if index is None or not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        return None
    return name if name in PIPELINE_FAMILIES else None


def _is_hub_id(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith(("/", ".", "~", BUILTIN_PREFIX)) and not Path(model).exists()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _hub_file(model_id: str, filename: str) -> Path | None:
    from huggingface_hub import hf_hub_download

    revision = allowed_revision(model_id)  # an id not on a set allow-list is refused here, before any download
    try:
        return Path(hf_hub_download(model_id, filename, revision=revision, local_files_only=_offline()))
    except Exception:  # offline and not cached, unknown id, no network: the UNet path's loader says how to fix it
        return None


# what a pipeline needs from a hub repository: every component folder's configs, weights and vocabularies,
# not the single-file checkpoints beside them nor the other precisions' copies
HUB_PATTERNS = ["model_index.json", "*/*"]
HUB_IGNORED = ["*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.fp16.*", "*.pb", "*.h5"]


def model_folder(model: str) -> Path:
    """A local folder as it is; a hub id as its snapshot at the allow-list's pinned revision."""
    folder = Path(model).expanduser()
    if folder.is_dir() or not _is_hub_id(model):
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=allowed_revision(model), allow_patterns=HUB_PATTERNS,
                                      ignore_patterns=HUB_IGNORED, local_files_only=_offline()))
    except RequestError:
        raise
    except Exception as error:  # offline, unknown id, no network: one clear message for all
        raise RequestError(
            f"model {model!r} could not be loaded from the hub ({type(error).__name__}). Without network access, "
            f"download it elsewhere (`huggingface-cli download {model} --local-dir DIR`), copy DIR here and set `model: DIR`."
        ) from None


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
    pipe, architecture = load_pipeline(model_folder(request.model), dtype)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            check_finite(Path(request.model), name, component)  # a hub id's snapshot too
    for stream in architecture.streams(pipe):  # a concept the tokenizers read as nothing (or <unk>) is not erasable
        for segment in stream.segments:
            check_concepts_against_tokenizer(
                request.concepts, getattr(pipe, segment.tokenizer), preprocess=lambda text: architecture.tokenized_text(pipe, [text])[0]
            )
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
    erased = eraser.erased_pipeline()
    seconds["fusion"] = time.perf_counter() - timer
    for stream in eraser.streams.values():  # nothing broken is published
        for edited in stream.maps:
            if not torch.isfinite(read_weight(architecture.denoiser(erased), edited)).all():
                raise RequestError(
                    f"the closed-form solve gave NaN or infinite weights in {edited.module}: the statistics are "
                    f"degenerate in {dtype}; load the model in float32"
                )
    rows = conditioning_rows(pipe, erased, eraser, [fill(PROBE_TEMPLATE, c) for c in request.preserve.concepts[:8]])

    timer = time.perf_counter()

    def write(staging: Path) -> dict:
        with quiet_progress():
            erased.save_pretrained(staging / "model")
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
