"""A pipeline family's prior and concept artifacts on disk (``erasure.methods.pipeline_edit``).

The UNet path's file names (``erasure.artifacts``), one entry per text stream: a tensor
``<stream>.<name>`` in the safetensors file. A concept folder holds no LoRA and no images (the
families' erasure is the closed form alone); a prior keeps its lineage in the file's metadata::

    prior.safetensors        per stream: the prior's sum and count; made_from, removed (metadata)
    statistics.safetensors   per stream: ConceptStatistics and the CFR map M_k
    concept.json             the concept spec, its prompt pairs and a summary

Takedown and restore rebuild an erased pipeline from these folders and the base alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from erasure.artifacts import CONCEPT_FILE, PRIOR_FILE, STATISTICS_FILE
from erasure.core.closed_form import DTYPE, ConceptStatistics, PriorStatistics
from erasure.methods.pipeline_edit import ErasedConcept, StreamConcept
from erasure.spec import ConceptSpec


def _split(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    streams: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stream, _, name = key.partition(".")
        streams.setdefault(stream, {})[name] = tensor
    return streams


def save_stream_prior(
    prior: dict[str, PriorStatistics], folder: Path, made_from: tuple[str, ...], removed: tuple[str, ...] = ()
) -> None:
    """Write every stream's prior statistics to ``folder/prior.safetensors``, with the retained
    concepts its prompts were drawn for (``made_from``) and those that have left it since (``removed``)."""
    tensors = {}
    for stream, statistics in prior.items():
        tensors[f"{stream}.total"] = statistics.total.contiguous()
        tensors[f"{stream}.count"] = torch.tensor([statistics.count])
    lineage = {"made_from": json.dumps(list(made_from)), "removed": json.dumps(list(removed))}
    save_file(tensors, str(Path(folder) / PRIOR_FILE), metadata=lineage)


def load_stream_prior(folder: Path) -> dict[str, PriorStatistics]:
    return {
        stream: PriorStatistics(parts["total"].to(DTYPE), int(parts["count"][0]))
        for stream, parts in _split(load_file(str(Path(folder) / PRIOR_FILE))).items()
    }


def stream_prior_lineage(folder: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(made_from, removed) of a prior ``save_stream_prior`` wrote."""
    with safe_open(str(Path(folder) / PRIOR_FILE), framework="pt") as opened:
        metadata = opened.metadata() or {}
    return tuple(json.loads(metadata.get("made_from", "[]"))), tuple(json.loads(metadata.get("removed", "[]")))


def save_stream_concept(erased: ErasedConcept, folder: Path, family: str) -> dict:
    """Write one concept's per-stream statistics; returns its summary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for stream, concept in erased.streams.items():
        parts = concept.statistics.to_tensors() | {"text_map": concept.text_map}
        tensors |= {f"{stream}.{name}": tensor.contiguous() for name, tensor in parts.items()}
    save_file(tensors, str(folder / STATISTICS_FILE))
    summary = {
        "name": erased.concept.name, "kind": erased.concept.kind, "anchor": erased.concept.anchor,
        "synonyms": list(erased.concept.synonyms), "family": family, "streams": sorted(erased.streams),
        "augmented_prompts": len(erased.pairs),
    }
    document = {"spec": json.loads(erased.concept.model_dump_json()), "pairs": erased.pairs, "summary": summary}
    (folder / CONCEPT_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return summary


def load_stream_concept(folder: Path) -> ErasedConcept:
    folder = Path(folder)
    document = json.loads((folder / CONCEPT_FILE).read_text())
    streams = {
        stream: StreamConcept(ConceptStatistics.from_tensors(parts), parts["text_map"].to(DTYPE))
        for stream, parts in _split(load_file(str(folder / STATISTICS_FILE))).items()
    }
    return ErasedConcept(ConceptSpec.model_validate(document["spec"]), [tuple(p) for p in document["pairs"]], streams)
