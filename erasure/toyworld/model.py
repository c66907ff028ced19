"""The toy world's text-to-image model: a pixel-space UNet and a small CLIP text encoder.

16x16 RGB images are denoised directly (no VAE). The UNet has three
resolutions (16, 8, 4) with cross-attention at 8x8 and 4x4; the text encoder is
a 2-layer, 64-wide CLIP transformer over our own BPE vocabulary, trained jointly
with the UNet. The trained model ships inside the package (``assets/toyworld``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from erasure.models import Components, load_folder, small_text_encoder
from erasure.prompts import template_words
from erasure.tokenizer import build_clip_tokenizer
from erasure.toyworld.settings import SAMPLING
from erasure.toyworld.world import vocabulary

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld"
MODEL_DIR = ASSET_DIR / "model"
CLASSIFIER_FILE = ASSET_DIR / "classifier.safetensors"
IMAGE_SIZE = 16
MAX_TOKENS = 16


def build_toyworld_components(seed: int = 0) -> Components:
    """The untrained toy model, deterministic per seed."""
    tokenizer = build_clip_tokenizer(vocabulary() + template_words(), model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = small_text_encoder(tokenizer, width=64)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=2,  # diffusers reads this as the number of heads
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",  # the cosine schedule suits small images
        clip_sample=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return Components(unet, text_encoder, tokenizer, scheduler, vae=None, defaults=SAMPLING.model_dump())


def load_toyworld_components(folder: Path = MODEL_DIR) -> Components:
    if not (Path(folder) / "unet").is_dir():
        raise FileNotFoundError(
            f"the toy-world model is missing at {folder}; train it with `erasure toyworld train --out {folder}`"
        )
    return load_folder(Path(folder))


def load_toyworld_classifier(path: Path = CLASSIFIER_FILE):
    from erasure.toyworld.classifier import load_classifier

    return load_classifier(path)
