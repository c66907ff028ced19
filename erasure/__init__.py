"""erasure: mass concept erasure for text-to-image diffusion models (MACE and friends)."""

__version__ = "0.1.0"
