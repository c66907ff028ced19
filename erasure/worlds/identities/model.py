"""The identity world's model: the toy world's pixel-space UNet on the frozen MiniLM encoder, wider
at 4x4, where cross-attention turns a name's state into its signature."""

from __future__ import annotations

from pathlib import Path

from erasure.diffusion.models import Components, load_folder
from erasure.worlds.toyworld.model import build_toyworld_components

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "identities"
MODEL_DIR = ASSETS / "model"
ACCURACY_FILE = ASSETS / "accuracy.json"  # what the committed model draws (``erasure toyworld accuracy``)
CHANNELS = (32, 64, 128)


def build_identity_components(seed: int = 0) -> Components:
    """The untrained identity model, deterministic per seed."""
    return build_toyworld_components(seed, "minilm", CHANNELS)


def load_identity_components(folder: Path = MODEL_DIR) -> Components:
    if not (Path(folder) / "unet").is_dir():
        raise FileNotFoundError(
            f"the identity world's model is missing at {folder}; train it with `erasure toyworld train --world "
            f"identities --out DIR` and copy DIR/model there"
        )
    return load_folder(folder)
