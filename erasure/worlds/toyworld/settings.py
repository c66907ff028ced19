"""The toy world's settings, each written once: how its model samples and how it is trained.

Light on purpose (pydantic only): the command line reads its defaults and help from here
without importing torch.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from erasure.spec import SamplingSettings

# How the toy model samples (its erasure_defaults.json): at CFG 3 it over-saturates
# (accuracy means 60-70 %), at 1.5 every concept is drawn >= 93.8 % (TRAINING.md).
SAMPLING = SamplingSettings(sampler_steps=25, guidance_scale=1.5)


class ToyTrainingSettings(BaseModel):
    """How the toy world's model and classifier are trained; `erasure toyworld train` reads its
    defaults and help from here. The committed model's own command is in TRAINING.md."""

    steps: int = Field(12000, ge=1, description="Training steps of the text-to-image model.")
    batch: int = Field(32, ge=1, description="Batch size.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, warm-up then cosine).")
    seed: int = Field(0, ge=0, description="Seed of everything.")
    warmup: int = Field(300, ge=1, description="Warm-up steps.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints (a killed run resumes from the last).")
    eval_every: int = Field(2000, ge=1, description="Steps between accuracy checks of the EMA model.")
    classifier_steps: int = Field(3000, ge=1, description="Training steps of the classifier (the judge).")


TRAINING = ToyTrainingSettings()
