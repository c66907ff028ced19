"""The diffusion model: loading and saving pipelines, sampling, per-concept images and masks, LoRA."""
