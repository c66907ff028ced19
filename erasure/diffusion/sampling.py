"""The denoising loop, written out: classifier-free guidance with DDIM.

Works for latent models (with a VAE) and pixel-space models (no VAE; the UNet
denoises images in [-1, 1] directly). Optionally reports cross-attention of
chosen tokens while it samples (used to build concept masks in the same pass).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from erasure.architectures.base import LoadedPipeline
from erasure.core.attention import AttentionMapAccumulator, probing
from erasure.core.text import encode, tokenize


def predicted_noise(scheduler, output: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The UNet's ``output`` at ``noisy`` (timestep ``t``) as the noise it implies."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    alpha_bar = scheduler.alphas_cumprod.to(output.device)[t].to(output.dtype).reshape(-1, *[1] * (output.ndim - 1))
    if kind == "v_prediction":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * noisy
    if kind == "sample":
        return (noisy - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()
    raise ValueError(f"unknown prediction_type {kind!r}")


def image_size(components) -> int:
    size = components.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    if components.vae is None:
        return size
    return size * 2 ** (len(components.vae.config.block_out_channels) - 1)


def initial_noise(components, seeds: list[int]) -> torch.Tensor:
    """One noise tensor per seed, so image i depends on seeds[i] alone."""
    config = components.unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    noise = [
        torch.randn((config.in_channels, size, size), generator=torch.Generator().manual_seed(int(seed)))
        for seed in seeds
    ]
    return torch.stack(noise).to(components.device)


@torch.no_grad()
def decode(components, latents: torch.Tensor) -> torch.Tensor:
    """Model space -> images in [0, 1], (n, 3, H, W)."""
    if components.vae is not None:
        latents = latents / components.vae.config.scaling_factor
        latents = components.vae.decode(latents).sample
    return ((latents.float() + 1) / 2).clamp(0, 1).cpu()


@torch.no_grad()
def encode_images(components, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> model space (VAE latents, deterministic mean; or pixels in [-1, 1])."""
    pixels = images.to(components.device) * 2 - 1
    if components.vae is None:
        return pixels
    return components.vae.encode(pixels).latent_dist.mean * components.vae.config.scaling_factor


@torch.no_grad()
def sample(
    components,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    record_tokens: torch.Tensor | None = None,
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generate one image per prompt (n, 3, H, W) in [0, 1].

    ``record_tokens`` (n, k) token positions: also return their cross-attention
    maps summed over heads' mean, layers and steps, (n, h, w) at model resolution.
    """
    if len(prompts) != len(seeds):
        raise ValueError("give one seed per prompt")
    if isinstance(components, LoadedPipeline):  # a family's pipeline samples through its own class
        if record_tokens is not None:
            raise ValueError("attention maps are recorded on the UNet path only")
        return components.sample(prompts, seeds, steps, guidance_scale), None
    images, maps = [], []
    for start in range(0, len(prompts), batch_size):
        part = slice(start, start + batch_size)
        tokens = None if record_tokens is None else record_tokens[part]
        ids, _ = tokenize(components.tokenizer, prompts[part])
        states = encode(components.text_encoder, ids)
        image, attention = _sample_batch(components, states, seeds[part], steps, guidance_scale, tokens)
        images.append(image)
        maps.append(attention)
    return torch.cat(images), (torch.cat(maps) if record_tokens is not None else None)


@torch.no_grad()
def sample_from_states(
    components, states: torch.Tensor, seeds: list[int], steps: int, guidance_scale: float, batch_size: int = 16
) -> torch.Tensor:
    """Generate one image per text-encoder state sequence ``states`` (n, L, d), (n, 3, H, W) in
    [0, 1]: what ``sample`` draws for a prompt, given its states instead of its words (a learned
    embedding has no words). The unconditional half still reads the states of ""."""
    if len(states) != len(seeds):
        raise ValueError("give one seed per state sequence")
    images = [
        _sample_batch(components, states[start : start + batch_size], seeds[start : start + batch_size],
                      steps, guidance_scale, None)[0]
        for start in range(0, len(states), batch_size)
    ]
    return torch.cat(images)


def _sample_batch(components, states, seeds, steps, guidance_scale, record_tokens):
    n = len(states)
    unet = components.unet
    cond = states.to(components.device, unet.dtype)
    guided = guidance_scale != 1.0
    if guided:
        empty_ids, _ = tokenize(components.tokenizer, [""])
        uncond = encode(components.text_encoder, empty_ids).to(components.device, unet.dtype).expand(n, -1, -1)
        context = torch.cat([uncond, cond])
    else:
        context = cond

    scheduler = DDIMScheduler.from_config(components.scheduler.config)
    scheduler.set_timesteps(steps, device=components.device)
    latents = initial_noise(components, seeds).to(unet.dtype) * scheduler.init_noise_sigma

    recorder = AttentionMapAccumulator(latents.shape[-1]) if record_tokens is not None else None
    with probing(unet) if recorder is not None else nullcontext() as probe:
        if recorder is not None:
            probe.listener, probe.token_index = recorder, record_tokens
            probe.batch_slice = slice(n, 2 * n) if guided else slice(None)
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            eps = unet(model_input, t, encoder_hidden_states=context).sample
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
    return decode(components, latents), (recorder.maps() if recorder is not None else None)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL image."""
    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """Images as ``to_pil`` saves them and ``from_pil`` reads them back (8 bits per channel): a
    stage that reads a concept's saved images gets the same numbers as one that made them."""
    return (images.clamp(0, 1) * 255).round() / 255


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def save_mask(mask: torch.Tensor, path: Path, size: int) -> None:
    """(h, w) bool mask -> black/white PNG at image size."""
    image = Image.fromarray(mask.numpy().astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    image.save(path)


def load_mask(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("L")) > 127)
