"""SD 3 / 3.5: an MMDiT. Its text stream starts at ``context_embedder``, one linear map over
[CLIP-L | CLIP-G states, zero-padded to T5's width] followed by T5's states along the sequence;
every block's joint attention reads what it makes. The pooled CLIP-L | CLIP-G state enters
through ``time_text_embed.text_embedder``.

Edited: ``context_embedder`` (the one text-only input every block's text stream grows from;
later blocks' text states depend on the timestep and the image, so no fixed set of states
describes them) and the pooled projection's first layer. Not edited: the per-block text
K/V (``add_k_proj`` / ``add_v_proj``)."""

from __future__ import annotations

import torch

from erasure.architectures.base import Architecture, EditedMap, Segment, TextStream, padded_length

T5_LENGTH = 256  # the pipeline's default max_sequence_length


class StableDiffusion3(Architecture):
    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"

    def t5_length(self, pipe) -> int:
        return padded_length(pipe, "tokenizer_3", T5_LENGTH)

    def streams(self, pipe) -> tuple[TextStream, ...]:
        segments = (Segment("tokenizer", pipe.tokenizer.model_max_length), Segment("tokenizer_3", self.t5_length(pipe)))
        return (
            TextStream("tokens", (EditedMap("context_embedder"),), segments),
            TextStream("pooled", (EditedMap("time_text_embed.text_embedder.linear_1"),)),
        )

    @torch.no_grad()
    def states(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device=pipe.transformer.device, do_classifier_free_guidance=False,
            max_sequence_length=self.t5_length(pipe),
        )
        return {"tokens": embeds.float().cpu(), "pooled": pooled.float().cpu()[:, None]}

    def sample_kwargs(self, pipe, size: int | None) -> dict:
        return {"max_sequence_length": self.t5_length(pipe)}
