"""Tiny, randomly initialised pipelines of every family, built from the classes' configs (no
download): what the tests and ``--tiny`` benchmarks erase, save, load and sample. They draw
noise, but every code path runs on them in seconds. The text is 16 tokens; CLIP is 64 wide
(SDXL's two side by side: 128), T5 128: wide enough that the retained prompts of a test leave
directions free to edit."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from erasure.core.prompts import template_words
from erasure.core.tokenizer import TINY_EXTRA_WORDS, build_clip_tokenizer, build_wordpiece_tokenizer

LENGTH = 16
CLIP_WIDTH = 64
T5_WIDTH = 128
FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart")


def _words() -> list[str]:
    return template_words() + TINY_EXTRA_WORDS


def _clip(tokenizer, projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=CLIP_WIDTH,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer):
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=T5_WIDTH // 4, d_ff=2 * T5_WIDTH, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))


def tiny_vae(flow: bool = False):
    """A 2-block VAE, 16x16 images to 8x8 latents (``flow``: with SD 3's and FLUX's latent shift)."""
    from diffusers import AutoencoderKL

    extra = {"shift_factor": 0.0, "scaling_factor": 1.0} if flow else {}  # SD3 and FLUX shift their latents
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16, **extra,
    )


def build_tiny_pipeline(family: str, seed: int = 0):
    """A tiny pipeline of ``family`` (one of ``FAMILIES``), deterministic in ``seed``; 16x16 images,
    every module in eval mode (as ``from_pretrained`` gives them: T5's dropout would make its
    states random)."""
    pipe = _build(family, seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return pipe


def _build(family: str, seed: int):
    import diffusers

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer(_words(), LENGTH)
    t5_tokenizer = build_wordpiece_tokenizer(_words(), "t5", LENGTH)
    ddpm = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if family in ("sd", "sdxl"):
        xl = family == "sdxl"
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
            cross_attention_dim=2 * CLIP_WIDTH if xl else CLIP_WIDTH, attention_head_dim=8, norm_num_groups=8,
            **({"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": CLIP_WIDTH + 6 * 8} if xl else {}),
        )
        if not xl:
            return diffusers.StableDiffusionPipeline(
                vae=tiny_vae(), text_encoder=_clip(clip_tokenizer), tokenizer=clip_tokenizer, unet=unet,
                scheduler=diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **ddpm),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        return diffusers.StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=_clip(clip_tokenizer), text_encoder_2=_clip(clip_tokenizer, projection=True),
            tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer, unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(**ddpm),
        )
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    if family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=T5_WIDTH, caption_projection_dim=16, pooled_projection_dim=2 * CLIP_WIDTH,
            out_channels=4, pos_embed_max_size=8,
        )
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=flow, vae=tiny_vae(flow=True),
            text_encoder=_clip(clip_tokenizer, projection=True), tokenizer=clip_tokenizer,
            text_encoder_2=_clip(clip_tokenizer, projection=True), tokenizer_2=clip_tokenizer,
            text_encoder_3=_t5(t5_tokenizer), tokenizer_3=t5_tokenizer,
        )
    if family == "flux":
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, axes_dims_rope=(2, 2, 4),
        )
        return diffusers.FluxPipeline(
            scheduler=flow, vae=tiny_vae(flow=True), text_encoder=_clip(clip_tokenizer), tokenizer=clip_tokenizer,
            text_encoder_2=_t5(t5_tokenizer), tokenizer_2=t5_tokenizer, transformer=transformer,
        )
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=64,
        sample_size=8, patch_size=2, caption_channels=T5_WIDTH, norm_num_groups=8,
    )
    return diffusers.PixArtSigmaPipeline(
        tokenizer=t5_tokenizer, text_encoder=_t5(t5_tokenizer), vae=tiny_vae(), transformer=transformer,
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )
