"""SD 1.x and 2.x: a UNet whose every ``attn2`` reads one CLIP encoder's last states."""

from __future__ import annotations

import torch

from erasure.architectures.base import Architecture, EditedMap, Segment, TextStream
from erasure.core.attention import cross_attention_projections


def cross_attention_maps(denoiser: torch.nn.Module) -> tuple[EditedMap, ...]:
    """Every text cross-attention key and value projection (``...attn2.to_k`` / ``to_v``; UNets,
    PixArt and Sana name them alike); an error when there is none."""
    return tuple(EditedMap(name) for name in cross_attention_projections(denoiser))


class StableDiffusion(Architecture):
    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)

    def streams(self, pipe) -> tuple[TextStream, ...]:
        return (TextStream("tokens", cross_attention_maps(pipe.unet), (Segment("tokenizer", pipe.tokenizer.model_max_length),)),)

    @torch.no_grad()
    def states(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = pipe.encode_prompt(prompts, pipe.text_encoder.device, 1, False)
        return {"tokens": embeds.float().cpu()}
