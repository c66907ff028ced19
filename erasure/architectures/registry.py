"""Which adapter a pipeline has, and loading a diffusers pipeline folder as its own class."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from erasure.architectures.base import Architecture
from erasure.architectures.flux import Flux
from erasure.architectures.pixart import PixArt
from erasure.architectures.sd import StableDiffusion
from erasure.architectures.sd3 import StableDiffusion3
from erasure.architectures.sdxl import StableDiffusionXL
from erasure.spec import RequestError

ARCHITECTURES: tuple[Architecture, ...] = (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux(), PixArt())
# The pipeline classes erased through an adapter alone (``erasure.erase_pipeline``); SD 1.x/2.x
# folders take the UNet path (``erasure.erase``), which also trains LoRAs, mines and audits.
PIPELINE_FAMILIES = tuple(c for a in ARCHITECTURES if a.family != "sd" for c in a.pipeline_classes)


def architecture_of(pipe) -> Architecture:
    """The adapter of a diffusers pipeline, by its class."""
    name = type(pipe).__name__
    for architecture in ARCHITECTURES:
        if name in architecture.pipeline_classes:
            return architecture
    supported = ", ".join(c for a in ARCHITECTURES for c in a.pipeline_classes)
    raise RequestError(f"pipeline {name} is not supported; supported: {supported}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(folder: Path, dtype: str = "float32"):
    """A diffusers-layout folder as its own pipeline class (``model_index.json`` names it), strictly
    offline, its weights in ``dtype`` (``DTYPES``: FLUX in float32 is 48 GB), with its adapter."""
    if dtype not in DTYPES:
        raise RequestError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise RequestError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        with quiet_progress():
            pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=DTYPES[dtype])
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise RequestError(f"model folder {str(folder)!r} does not load as a diffusers pipeline ({reason})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe, architecture_of(pipe)


@contextmanager
def quiet_progress() -> Iterator[None]:
    """diffusers' and transformers' per-file progress bars off (loading and saving a pipeline
    draws a dozen of them), on again afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def save_pipeline(pipe, folder: Path) -> None:
    """``pipe`` in its class's diffusers layout, without the ``_name_or_path`` diffusers writes into
    its configs: the folder it was loaded from (a worker's path, a hub cache's snapshot) is no part
    of a model, and would make the same weights two artifacts of different digests."""
    folder = Path(folder)
    with quiet_progress():
        pipe.save_pretrained(folder)
    for config in (folder / "model_index.json", *folder.glob("*/config.json")):
        document = json.loads(config.read_text())
        if isinstance(document, dict) and "_name_or_path" in document:
            del document["_name_or_path"]
            config.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
