"""Kept for registered versions made before ``erasure/`` had sub-packages: the serving code each
logged with it (its copy of ``tasks/pyfunc_model.py``) imports these names from here. New code
imports ``erasure.loading`` and ``erasure.diffusion.models``."""

from erasure.diffusion.models import sampling_defaults
from erasure.loading import load_components

__all__ = ["load_components", "sampling_defaults"]
