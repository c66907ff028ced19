"""Per-concept training data: images from the base model and masks of the concept.

The default masks are weights-free (docs/method.md, "Data per concept"): the concept tokens'
cross-attention maps, captured in the same sampling pass that draws the images,
summed over layers, heads and steps, min-max normalised per image and
thresholded. Styles, and ``mask_mode: none``, use the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasure.core.prompts import GENERATION_TEMPLATES, fill
from erasure.core.text import align_tokens, tokenize
from erasure.diffusion.sampling import sample
from erasure.spec import ConceptSpec, MethodSettings, RequestError


@dataclass
class ConceptData:
    """A concept's training images and their cross-attention masks, and the prompt that drew them."""

    prompt: str
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    masks: torch.Tensor  # (n, h, w) bool, at model (latent or pixel) resolution


def concept_token_span(tokenizer, prompt: str, concept: str, anchor: str) -> tuple[int, ...]:
    """Positions of ``concept``'s tokens in ``prompt`` (found by aligning with the anchor prompt)."""
    ids, lengths = tokenize(tokenizer, [prompt, prompt.replace(concept, anchor, 1)])
    alignment = align_tokens(ids[0].tolist(), int(lengths[0]), ids[1].tolist(), int(lengths[1]))
    if not alignment.concept_span:
        raise RequestError(f"the concept {concept!r} was cut off in {prompt!r} by the tokenizer's length limit")
    return alignment.concept_span


def attention_masks(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """(n, h, w) attention maps -> (n, h, w) bool: min-max normalise per image, keep > threshold."""
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    normalised = (flat - low) / (high - low).clamp_min(1e-12)
    return (normalised > threshold).reshape(maps.shape)


def needs_images(settings: MethodSettings) -> bool:
    """Only a LoRA (or an increment) trains on the base model's images: a closed-form-only erasure
    (``lora_steps: 0``) draws none, which is what makes a thousand concepts cheap."""
    return settings.lora_steps > 0


def no_images(concept: ConceptSpec) -> ConceptData:
    """The data of a concept whose erasure trains nothing: no image, no mask."""
    return ConceptData(
        prompt=fill(GENERATION_TEMPLATES[concept.kind], concept.name),
        images=torch.empty(0, 3, 0, 0), masks=torch.empty(0, 0, 0, dtype=torch.bool),
    )


def generate_concept_data(components, concept: ConceptSpec, settings: MethodSettings, seed: int) -> ConceptData:
    """Stage 2b: the base model's images of a concept's prompts and their cross-attention masks."""
    prompt = fill(GENERATION_TEMPLATES[concept.kind], concept.name)
    n = settings.images_per_concept
    seeds = [seed * 1_000_003 + i for i in range(n)]
    use_attention = settings.mask_mode == "attention" and concept.kind != "style"
    tokens = None
    if use_attention:
        span = concept_token_span(components.tokenizer, prompt, concept.name, concept.anchor)
        tokens = torch.tensor([span] * n)
    images, maps = sample(
        components, [prompt] * n, seeds, settings.sampler_steps, settings.guidance_scale, record_tokens=tokens
    )
    if use_attention:
        masks = attention_masks(maps, settings.mask_threshold)
    else:
        config = components.unet.config
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        masks = torch.ones(n, size, size, dtype=torch.bool)
    return ConceptData(prompt=prompt, images=images, masks=masks)
