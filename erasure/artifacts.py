"""A concept's erasure artifact on disk, and reading it back.

One folder per concept::

    pytorch_lora_weights.safetensors   the LoRA (diffusers format; pipe.load_lora_weights reads the folder)
    statistics.safetensors             ConceptStatistics + its CFR map M_k: all the fusion needs
    data/image_XX.png, mask_XX.png     what the LoRA was trained on
    concept.json                       the concept spec and a summary (mask coverage, losses, timings)

Takedown and restore rebuild a model from these folders alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from erasure.core.closed_form import DTYPE, ConceptStatistics, PriorStatistics
from erasure.diffusion.lora import load_lora_factors, save_lora
from erasure.diffusion.sampling import from_pil, save_mask, to_pil
from erasure.spec import ConceptSpec, normalise


def slug(name: str) -> str:
    """A concept's folder name: readable, and unique per normalised name ("van gogh" and
    "van-gogh", or two non-Latin names, differ in their hash suffix)."""
    readable = re.sub(r"[^a-z0-9]+", "-", normalise(name)).strip("-")[:40].strip("-") or "concept"
    return f"{readable}-{hashlib.sha256(normalise(name).encode()).hexdigest()[:8]}"


STATISTICS_FILE = "statistics.safetensors"
CONCEPT_FILE = "concept.json"
PRIOR_FILE = "prior.safetensors"


@dataclass
class ConceptArtifact:
    """What fusion needs of a concept (its statistics, CFR map, LoRA factors), plus its summary."""

    concept: ConceptSpec
    statistics: ConceptStatistics
    text_map: torch.Tensor
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    summary: dict


def save_concept(result, folder: Path) -> dict:
    """Write a ``ConceptResult`` (from ``erase_concept``) to ``folder``; returns its summary."""
    folder = Path(folder)
    save_lora(result.lora_state, folder)
    tensors = {k: v.contiguous() for k, v in result.statistics.to_tensors().items()}
    save_file(tensors | {"text_map": result.text_map.contiguous()}, str(folder / STATISTICS_FILE))
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for i, (image, mask) in enumerate(zip(result.data.images, result.data.masks)):
        picture = to_pil(image)
        picture.save(data_dir / f"image_{i:02d}.png")
        save_mask(mask, data_dir / f"mask_{i:02d}.png", picture.width)
    summary = {
        "name": result.concept.name,
        "kind": result.concept.kind,
        "anchor": result.concept.anchor,
        "synonyms": list(result.concept.synonyms),
        "generation_prompt": result.data.prompt,
        "augmented_prompts": len(result.text.prompts),
        "mined_words": [[word, round(cosine, 4)] for word, cosine in result.text.mined_words],
        "discovery": (
            result.text.discovery.as_dict() | {"erased": result.text.erased_aliases} if result.text.discovery is not None else None
        ),
        "mask_coverage": round(float(result.data.masks.float().mean()), 4) if result.data.masks.numel() else None,
        "lora_loss_first": round(result.losses[0], 6) if result.losses else None,
        "lora_loss_last": round(result.losses[-1], 6) if result.losses else None,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
    }
    document = {"spec": json.loads(result.concept.model_dump_json()), "summary": summary}
    (folder / CONCEPT_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return summary


def load_concept(folder: Path) -> ConceptArtifact:
    """A concept artifact folder (``save_concept``) as the fusion reads it: statistics, CFR map, LoRA factors."""
    folder = Path(folder)
    document = json.loads((folder / CONCEPT_FILE).read_text())
    tensors = load_file(str(folder / STATISTICS_FILE))
    return ConceptArtifact(
        concept=ConceptSpec.model_validate(document["spec"]),
        statistics=ConceptStatistics.from_tensors(tensors),
        text_map=tensors["text_map"].to(DTYPE),
        factors=load_lora_factors(folder),
        summary=document["summary"],
    )


def load_concept_images(folder: Path) -> torch.Tensor:
    """The base model's images of a concept that ``save_concept`` wrote (its LoRA's training
    images), (n, 3, H, W) in [0, 1]."""
    # by number: image_100 comes after image_99, as save_concept wrote them
    paths = sorted((Path(folder) / "data").glob("image_*.png"), key=lambda path: int(path.stem.split("_")[1]))
    if not paths:
        raise FileNotFoundError(f"{folder}: the concept artifact holds no images (data/image_*.png)")
    return torch.stack([from_pil(Image.open(path)) for path in paths])


def summary_aliases(summary: dict) -> list[str] | None:
    """The alias phrases erased with a concept (those its discovery found, combined across the words
    of its name, at most ``max_phrases``), from its ``concept.json`` summary (what ``save_concept``
    returns); None when discovery did not run for it."""
    discovery = summary.get("discovery") if isinstance(summary, dict) else None
    if not isinstance(discovery, dict) or not isinstance(discovery.get("erased"), list):
        return None
    return [str(phrase) for phrase in discovery["erased"]]


def discovered_aliases(output: Path, names: list[str]) -> dict[str, list[str]]:
    """Concept name -> the alias phrases its discovery found, for the concepts ``names`` of an
    erasure output folder (``output/concepts/<slug>/``) that ran discovery; {} for any other folder."""
    found: dict[str, list[str]] = {}
    for name in names:
        try:
            summary = json.loads((Path(output) / "concepts" / slug(name) / CONCEPT_FILE).read_text())["summary"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        aliases = summary_aliases(summary)
        if aliases is not None:
            found[name] = aliases
    return found


PRIOR_LINEAGE_FILE = "prior.json"


def save_prior(prior: PriorStatistics, path: Path, made_from: tuple[str, ...] | None = None, removed: tuple[str, ...] = ()) -> None:
    """Write the prior's sufficient statistics (safetensors) and, given ``made_from``, beside them
    which retained concepts its prompts were drawn for and which have left it since (``removed``)."""
    save_file({"total": prior.total.contiguous(), "count": torch.tensor([prior.count])}, str(path))
    if made_from is not None:
        lineage = {"made_from": list(made_from), "removed": list(removed)}
        (Path(path).parent / PRIOR_LINEAGE_FILE).write_text(json.dumps(lineage, indent=1) + "\n")


def prior_lineage(folder: Path) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(made_from, removed) of a prior folder ``save_prior`` wrote with them; None for one without."""
    path = Path(folder) / PRIOR_LINEAGE_FILE
    if not path.is_file():
        return None
    lineage = json.loads(path.read_text())
    return tuple(lineage["made_from"]), tuple(lineage["removed"])


def load_prior(path: Path) -> PriorStatistics:
    """Read the prior's sufficient statistics that ``save_prior`` wrote."""
    tensors = load_file(str(path))
    return PriorStatistics(tensors["total"].to(DTYPE), int(tensors["count"][0]))
