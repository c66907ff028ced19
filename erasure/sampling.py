"""Kept for registered versions made before ``erasure/`` had sub-packages: the serving code each
logged with it (its copy of ``tasks/pyfunc_model.py``) imports ``sample`` from here. New code
imports ``erasure.diffusion.sampling``."""

from erasure.diffusion.sampling import sample

__all__ = ["sample"]
