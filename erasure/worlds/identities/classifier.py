"""The identity world's judge network: the toy classifier with one head per signature attribute.

Trained on clean renders of every signature (all 3,072, not only the identities', so it reads
attributes rather than memorising faces) and of the grey generic figure, with light noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from erasure.worlds.identities.world import (
    ATTRIBUTES,
    CLASSES,
    every_signature,
    neutral_signature,
    render_signature,
)
from erasure.worlds.toyworld.classifier import ToyClassifier, held_out_accuracy, load_classifier, train_classifier

CLASSIFIER_FILE = Path(__file__).resolve().parents[2] / "assets" / "identities" / "classifier.safetensors"
EVERY_SIGNATURE = every_signature()
NEUTRAL_P = 0.1


def signature_batch(rng: np.random.Generator, count: int, size: int, noise: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Renders of random signatures (grey generic figures among them) and their class indices."""
    drawn = [
        neutral_signature(rng) if rng.random() < NEUTRAL_P else EVERY_SIGNATURE[rng.integers(len(EVERY_SIGNATURE))]
        for _ in range(count)
    ]
    x = torch.from_numpy(np.stack([render_signature(s, rng, size) for s in drawn])).permute(0, 3, 1, 2).float() / 255
    if noise > 0:  # samples of a diffusion model are not clean renders
        sigma = torch.from_numpy(rng.uniform(0, noise, size=(count, 1, 1, 1))).float()
        x = (x + sigma * torch.from_numpy(rng.standard_normal(x.shape)).float()).clamp(0, 1)
    labels = {k: torch.tensor([CLASSES[k].index(s[k]) for s in drawn]) for k in ATTRIBUTES}
    return x, labels


def train_identity_classifier(steps: int, seed: int = 0, log=print) -> ToyClassifier:
    return train_classifier(steps, seed=seed, log=log, heads=CLASSES, make_batch=signature_batch)


def identity_classifier_accuracy(model: ToyClassifier, count: int = 2000) -> dict[str, float]:
    return held_out_accuracy(model, count=count, make_batch=signature_batch)


def load_identity_classifier(path: Path = CLASSIFIER_FILE) -> ToyClassifier:
    return load_classifier(path, heads=CLASSES)
