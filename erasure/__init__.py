"""erasure: mass concept erasure for text-to-image diffusion models (MACE and friends)."""

import logging

__version__ = "0.1.0"


class _NoTorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' notice that CLIP's and Siglip's image processors fall back to their PIL
    versions without torchvision. diffusers' pipelines touch both names on import, so every command
    printed it twice; we never use the torchvision backend (the CLIP judge preprocesses on PIL
    images), so the fallback is the intended behaviour. Every other warning passes."""

    NOTICES = tuple(f"`{name}ImageProcessor` requires torchvision (not installed)" for name in ("CLIP", "Siglip"))

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


# transformers logs through the standard library under its module names; a filter on the one logger
# that emits the notice needs no import of transformers here
logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
