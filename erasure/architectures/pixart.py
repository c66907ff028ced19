"""PixArt-alpha / Sigma: a DiT whose every block's ``attn2`` reads T5's states after
``caption_projection`` (a fixed two-layer MLP, the same at every timestep)."""

from __future__ import annotations

import torch
from diffusers.utils import is_bs4_available, is_ftfy_available

from erasure.architectures.base import Architecture, Segment, TextStream, padded_length
from erasure.architectures.sd import cross_attention_maps

T5_LENGTH = 300  # PixArt-Sigma's default max_sequence_length


def cleans_captions() -> bool:
    """What the pipeline's ``clean_caption=True`` default does here: it cleans (and lower-cases)
    captions when bs4 and ftfy are installed, else falls back to lower-casing them. The states
    erased must be those a served call reads."""
    return is_bs4_available() and is_ftfy_available()


class PixArt(Architecture):
    family = "pixart"
    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    denoiser_name = "transformer"
    # the pipelines have no load_lora_weights (the transformer has no PEFT loader either in diffusers 0.42):
    # an exported LoRA could not be applied, so none is exported
    supports_lora_loading = False

    def t5_length(self, pipe) -> int:
        return padded_length(pipe, "tokenizer", T5_LENGTH)

    def streams(self, pipe) -> tuple[TextStream, ...]:
        return (TextStream("tokens", cross_attention_maps(pipe.transformer), (Segment("tokenizer", self.t5_length(pipe)),)),)

    def tokenized_text(self, pipe, prompts: list[str]) -> list[str]:
        return pipe._text_preprocessing(prompts, clean_caption=cleans_captions())  # the pipeline's own preprocessing

    def text_settings(self, pipe) -> dict:
        return {"clean_caption": cleans_captions()}  # served where bs4 or ftfy differ, the model reads other text

    @torch.no_grad()
    def states(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, _, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=pipe.transformer.device, clean_caption=cleans_captions(),
            max_sequence_length=self.t5_length(pipe),
        )
        projected = pipe.transformer.caption_projection(embeds.to(pipe.transformer.dtype))
        return {"tokens": projected.float().cpu()}

    def sample_kwargs(self, pipe, size: int | None) -> dict:
        # a size of our choosing is drawn as asked, not snapped to the nearest trained aspect-ratio bin
        binning = {"use_resolution_binning": False} if size is not None else {}
        return {"max_sequence_length": self.t5_length(pipe), "clean_caption": cleans_captions(), **binning}
