"""A classifier of the toy world: shape, colour and style heads on one small CNN.

It is the toy world's judge (like the celebrity detector and CLIP in the paper's
benchmarks): trained on clean renders with light noise, it reads samples of the
text-to-image model and says what they show.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from erasure.worlds.toyworld.world import COLOURS, SHAPES, STYLES, sample_batch

HEADS = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}


class ToyClassifier(nn.Module):
    """``heads``: attribute -> its class names (the toy world's shape, colour and style by default)."""

    def __init__(self, width: int = 32, heads: dict[str, tuple[str, ...]] = HEADS):
        super().__init__()
        self.labels = dict(heads)

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.features = nn.Sequential(
            block(3, width, 1), block(width, width, 1), block(width, 2 * width, 2), block(2 * width, 2 * width, 1),
            block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 1),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width, len(labels)) for name, labels in heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (n, 3, H, W) in [0, 1] -> logits per head."""
        features = self.features(images * 2 - 1).mean(dim=(2, 3))
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        self.eval()
        logits = self(images.to(next(self.parameters()).device).float())
        return {name: [labels[i] for i in logits[name].argmax(dim=1).tolist()] for name, labels in self.labels.items()}


def _batch(rng: np.random.Generator, count: int, size: int, noise: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, _, scenes = sample_batch(rng, count, size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    if noise > 0:
        # samples of a diffusion model are not clean renders: train on a range of noise
        sigma = torch.from_numpy(rng.uniform(0, noise, size=(count, 1, 1, 1))).float()
        x = (x + sigma * torch.from_numpy(rng.standard_normal(x.shape)).float()).clamp(0, 1)
    labels = {
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
        "colour": torch.tensor([COLOURS.index(s.colour) for s in scenes]),
        "style": torch.tensor([STYLES.index(s.style) for s in scenes]),
    }
    return x, labels


def train_classifier(
    steps: int, batch: int = 128, size: int = 16, seed: int = 0, log=print, heads: dict = HEADS, make_batch=_batch
) -> ToyClassifier:
    """``make_batch(rng, count, size, noise) -> (images, labels per head)``: the world's renders."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ToyClassifier(heads=heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    started = time.time()
    for step in range(steps):
        x, labels = make_batch(rng, batch, size, noise=0.08)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in heads)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 250 == 0:
            log(f"classifier step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f}s)")
    return model.eval()


@torch.no_grad()
def held_out_accuracy(
    model: ToyClassifier, count: int = 2000, size: int = 16, seed: int = 12345, make_batch=_batch
) -> dict[str, float]:
    """Accuracy per head, and of all heads at once (``all``), on fresh clean renders from a seed
    never used in training."""
    x, labels = make_batch(np.random.default_rng(seed), count, size, noise=0.0)
    logits = model.eval()(x)
    right = {k: logits[k].argmax(1) == labels[k] for k in model.labels}
    return {k: float(r.float().mean()) for k, r in right.items()} | {"all": float(torch.stack(list(right.values())).all(0).float().mean())}


def save_classifier(model: ToyClassifier, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Path, heads: dict[str, tuple[str, ...]] = HEADS) -> ToyClassifier:
    model = ToyClassifier(heads=heads)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
