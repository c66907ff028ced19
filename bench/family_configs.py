"""Real-size pipelines of each family from their published configurations, random weights
(nothing is downloaded; random weights cost what trained ones cost). Used by
``bench/gpu.py --family``. The VAE is the tiny one: the closed-form path never decodes, so a
full VAE would only take memory the measurement does not need.

Parameter counts these configs give (``parameters``, on the meta device, checked by the
tests): SDXL UNet 2.57 B, SD 3.5-medium transformer 2.24 B (joint blocks 0-12 dual), FLUX.1
transformer 11.9 B, T5-XXL encoder 4.76 B, CLIP-L 123 M, OpenCLIP-G 695 M.
"""

from __future__ import annotations

import torch

FAMILIES = ("sdxl", "sd35-medium", "flux")

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
              hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def tokenizers_for_bench():
    """Our small CLIP BPE (77 tokens) and T5-style WordPiece (512) vocabularies over the
    templates' words: real tokenizers cannot be downloaded here, and the text models' embedding
    tables keep their real row counts."""
    from erasure.core.prompts import template_words
    from erasure.core.tokenizer import build_clip_tokenizer, build_wordpiece_tokenizer
    from erasure.diffusion.models import TINY_EXTRA_WORDS

    words = template_words() + TINY_EXTRA_WORDS
    return build_clip_tokenizer(words, model_max_length=77), build_wordpiece_tokenizer(words, "t5", model_max_length=512)


def _clip(tokenizer, config: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    full = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(full)


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   **T5_XXL))


def real_size_pipeline(family: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """``family``'s pipeline at its real size on ``device``, every weight created there in ``dtype``
    (an fp32 copy of FLUX alone would be 48 GB). Tokenizers: our small BPE and WordPiece
    vocabularies (the embedding tables keep the real row counts, so memory is the real one)."""
    import diffusers

    from erasure.architectures.tiny import tiny_vae

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    clip_tokenizer, t5_tokenizer = tokenizers_for_bench()
    # schedulers keep their tables on the CPU: made before the device context
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return _build(diffusers, family, clip_tokenizer, t5_tokenizer, tiny_vae, euler, flow)
    finally:
        torch.set_default_dtype(previous)


def _build(diffusers, family, clip_tokenizer, t5_tokenizer, vae, euler, flow):
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=vae(), text_encoder=_clip(clip_tokenizer, CLIP_L, False), text_encoder_2=_clip(clip_tokenizer, CLIP_G, True),
            tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer, unet=diffusers.UNet2DConditionModel(**SDXL_UNET),
            scheduler=euler,
        )
    if family == "sd35-medium":
        return diffusers.StableDiffusion3Pipeline(
            transformer=diffusers.SD3Transformer2DModel(**SD35_MEDIUM), scheduler=flow, vae=vae(flow=True),
            text_encoder=_clip(clip_tokenizer, CLIP_L, True), tokenizer=clip_tokenizer,
            text_encoder_2=_clip(clip_tokenizer, CLIP_G, True), tokenizer_2=clip_tokenizer,
            text_encoder_3=_t5(t5_tokenizer), tokenizer_3=t5_tokenizer,
        )
    return diffusers.FluxPipeline(
        scheduler=flow, vae=vae(flow=True), text_encoder=_clip(clip_tokenizer, CLIP_L, False), tokenizer=clip_tokenizer,
        text_encoder_2=_t5(t5_tokenizer), tokenizer_2=t5_tokenizer, transformer=diffusers.FluxTransformer2DModel(**FLUX_DEV),
    )


def parameters(family: str) -> dict[str, int]:
    """Each component's parameter count at real size, built on the meta device (nothing allocated)."""
    pipe = real_size_pipeline(family, device="meta", dtype=torch.float32)
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
