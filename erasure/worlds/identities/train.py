"""Training the identity world's model: the toy world's trainer (frozen MiniLM, epsilon prediction,
Min-SNR, EMA, resumable checkpoints) on the identity world's captions and renders."""

from __future__ import annotations

from pathlib import Path

from erasure.worlds.identities.model import build_identity_components
from erasure.worlds.identities.world import sample_batch
from erasure.worlds.toyworld.train import train_toyworld


def train_identity_world(out_dir: Path, **settings) -> tuple[Path, list[float]]:
    """``train_toyworld``'s settings (steps, batch, lr, seed, evaluate, log, ...) for this world."""
    return train_toyworld(out_dir, world="identities", build=build_identity_components, sample_batch=sample_batch, **settings)
