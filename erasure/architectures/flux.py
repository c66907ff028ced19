"""FLUX.1: double-stream blocks (text and image streams with their own projections) then
single-stream blocks that share one Q/K/V across text and image tokens. The text stream starts
at ``context_embedder`` over T5's states; CLIP's pooled state enters through
``time_text_embed.text_embedder``.

Edited: ``context_embedder`` (in the single-stream blocks no map reads text alone: this is the
text-only input) and the pooled projection's first layer. Not edited: the double-stream blocks'
text K/V (``add_k_proj`` / ``add_v_proj``). FLUX.1-dev is guidance-distilled and makes no unconditional
pass; the empty prompt is held still all the same, for true CFG with a negative prompt."""

from __future__ import annotations

import torch

from erasure.architectures.base import Architecture, EditedMap, Segment, TextStream, padded_length

T5_LENGTH = 512  # the pipeline's default max_sequence_length


class Flux(Architecture):
    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_name = "transformer"

    def t5_length(self, pipe) -> int:
        return padded_length(pipe, "tokenizer_2", T5_LENGTH)

    def streams(self, pipe) -> tuple[TextStream, ...]:
        return (
            TextStream("tokens", (EditedMap("context_embedder"),), (Segment("tokenizer_2", self.t5_length(pipe)),)),
            TextStream("pooled", (EditedMap("time_text_embed.text_embedder.linear_1"),)),
        )

    @torch.no_grad()
    def states(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=pipe.transformer.device, max_sequence_length=self.t5_length(pipe))
        return {"tokens": embeds.float().cpu(), "pooled": pooled.float().cpu()[:, None]}

    def sample_kwargs(self, pipe, size: int | None) -> dict:
        return {"max_sequence_length": self.t5_length(pipe)}
