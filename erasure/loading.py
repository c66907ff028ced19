"""Any model a request can name: ``builtin:<name>`` (the worlds' registry), a local diffusers
folder or a hub id (``erasure.diffusion.models``)."""

from __future__ import annotations

import torch

from erasure.diffusion.models import Components, load_external
from erasure.spec import RequestError
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
