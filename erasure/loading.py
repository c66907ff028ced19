"""Any model a request can name: ``builtin:<name>`` (the worlds' registry), a local diffusers
folder or a hub id (``erasure.diffusion.models``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from erasure.architectures.base import LoadedPipeline
from erasure.architectures.registry import PIPELINE_FAMILIES, load_pipeline
from erasure.diffusion.models import (
    Components,
    allowed_revision,
    check_finite,
    fingerprint,
    load_external,
    pipeline_fingerprint,
)
from erasure.spec import BUILTIN_PREFIX, RequestError
from erasure.worlds.builtins import find_builtin


def load_components(model: str, device: str | torch.device = "cpu") -> Components:
    """Load ``model`` onto ``device``, in eval mode."""
    try:
        builtin = find_builtin(model)
    except ValueError as error:
        raise RequestError(str(error)) from None
    if builtin is None:
        return load_external(model, device)
    return builtin.load().to(device).eval()


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
    except (OSError, ValueError, AttributeError):  # unreadable: the UNet path's loader says what is wrong
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


def load_model(model: str, device: str | torch.device = "cpu", dtype: str = "float32") -> Components | LoadedPipeline:
    """``model`` as the stages hold it: a family's pipeline folder or hub id (``pipeline_family``)
    as its pipeline class with its adapter, in ``dtype``; anything else as ``load_components`` does."""
    if pipeline_family(model) is None:
        return load_components(model, device)
    pipe, architecture = load_pipeline(model_folder(model), dtype)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            check_finite(Path(model), name, component)  # a corrupt base is never erased, served or audited
    return LoadedPipeline(pipe.to(device), architecture)


def model_fingerprint(model: Components | LoadedPipeline) -> str:
    """What names a base model in every key: a family's whole pipeline and the settings of this
    machine that change the text it reads (PixArt's caption cleaning needs two optional packages:
    workers that differ there are different models), else ``Components``'."""
    if not isinstance(model, LoadedPipeline):
        return fingerprint(model)
    settings = json.dumps(model.architecture.text_settings(model.pipe), sort_keys=True)
    return hashlib.sha256(f"{pipeline_fingerprint(model.pipe)}|{settings}".encode()).hexdigest()
