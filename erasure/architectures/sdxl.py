"""SDXL: a UNet whose ``attn2`` reads two CLIP encoders' penultimate states side by side, and
whose ``add_embedding`` reads the second encoder's pooled, projected state beside the size
conditioning."""

from __future__ import annotations

import torch

from erasure.architectures.base import Architecture, EditedMap, Segment, TextStream
from erasure.architectures.sd import cross_attention_maps


class StableDiffusionXL(Architecture):
    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    def streams(self, pipe) -> tuple[TextStream, ...]:
        # both tokenizers split a prompt alike (one BPE); they differ in the padding token only
        tokens = TextStream("tokens", cross_attention_maps(pipe.unet), (Segment("tokenizer", pipe.tokenizer.model_max_length),))
        pooled_width = pipe.text_encoder_2.config.projection_dim
        # get_aug_embed concatenates [text_embeds, time_embeds]: the text is the first columns
        pooled = TextStream("pooled", (EditedMap("add_embedding.linear_1", (0, pooled_width)),))
        return tokens, pooled

    @torch.no_grad()
    def states(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe.text_encoder_2.device, do_classifier_free_guidance=False)
        return {"tokens": embeds.float().cpu(), "pooled": pooled.float().cpu()[:, None]}

    def unconditional_states(self, pipe) -> dict[str, torch.Tensor]:
        if pipe.config.force_zeros_for_empty_prompt:  # the unconditional input is zeros: no edit moves it
            return {name: torch.zeros_like(states[0]) for name, states in self.states(pipe, [""]).items()}
        return super().unconditional_states(pipe)
