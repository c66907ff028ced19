"""PixArt-alpha / Sigma: a DiT whose every block's ``attn2`` reads T5's states after
``caption_projection`` (a fixed two-layer MLP, the same at every timestep)."""

from __future__ import annotations

import torch

from erasure.architectures.base import Architecture, Segment, TextStream
from erasure.architectures.sd import cross_attention_maps

T5_LENGTH = 300  # PixArt-Sigma's default max_sequence_length


class PixArt(Architecture):
    family = "pixart"
    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    denoiser_name = "transformer"
    supports_lora_loading = False  # the pipeline has no load_lora_weights; the transformer's load_lora_adapter loads it

    def t5_length(self, pipe) -> int:
        return min(pipe.tokenizer.model_max_length, T5_LENGTH)

    def streams(self, pipe) -> tuple[TextStream, ...]:
        return (TextStream("tokens", cross_attention_maps(pipe.transformer), (Segment("tokenizer", self.t5_length(pipe)),)),)

    @torch.no_grad()
    def states(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, _, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=pipe.transformer.device, clean_caption=False,
            max_sequence_length=self.t5_length(pipe),
        )
        projected = pipe.transformer.caption_projection(embeds.to(pipe.transformer.dtype))
        return {"tokens": projected.float().cpu()}

    def sample_kwargs(self, pipe) -> dict:
        return {"max_sequence_length": self.t5_length(pipe),
                "use_resolution_binning": False, "clean_caption": False}
