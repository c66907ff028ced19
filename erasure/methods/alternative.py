"""All-but-One: a per-concept LoRA that moves the concept's guidance direction onto its alternative's.

Classifier-free guidance steers sampling along ``eps(x, c) - eps(x, "")``. Instead of
silencing the concept tokens' attention (MACE, ``erasure.diffusion.lora``), this objective asks the
erased model to steer, for a concept prompt ``c_j``, the way the *base* model steers for the
same prompt with the alternative (the concept's anchor) in its place, ``a_j``:

    loss = mean || [eps'(x_t, c_j) - eps'(x_t, "")] - [eps(x_t, a_j) - eps(x_t, "")] ||^2
         + drift_weight * mean || eps'(x_t, "") - eps(x_t, "") ||^2

``eps'`` is the LoRA'd model refined by the concept's CFR map (the same rank-r peft LoRA
on every ``attn2.to_k``/``to_v`` as MACE's), ``eps`` the frozen base model. Matching only
the guidance *difference* leaves the unconditional prediction free to wander, and every
prompt's guided sample is built on it; the drift term holds it still (All-but-One's
lambda). ``erasure.evaluation.metrics.unconditional_drift`` measures that wander for any erased model,
so the benchmark reports it for every method.

Predictions are compared as noise (epsilon) whatever the model predicts (``v`` or the
sample), so one ``drift_weight`` means the same on every model.
"""

from __future__ import annotations

import random

import torch

from erasure.core.text import empty_prompt_states, encode, tokenize
from erasure.diffusion.lora import exported_lora, lora_unet, noisy_sample, timestep_weights
from erasure.diffusion.sampling import encode_images, predicted_noise


def train_alternative_lora(
    components,
    text_map: torch.Tensor,
    images: torch.Tensor,
    prompts: list[str],
    alternative_prompts: list[str],
    rank: int,
    lr: float,
    steps: int,
    drift_weight: float,
    importance_sampling: bool,
    seed: int,
    on_step=None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], list[float]]:
    """Train one concept's All-but-One LoRA on the model refined by its CFR map ``text_map``.

    ``prompts[j]``: a concept prompt; ``alternative_prompts[j]``: the same prompt with the
    alternative instead. Returns what ``erasure.diffusion.lora.train_concept_lora`` does: (factors
    {projection: (up, down)}, the LoRA state dict in diffusers format, the loss per step).
    """
    if len(prompts) != len(alternative_prompts):
        raise ValueError(f"{len(prompts)} concept prompts but {len(alternative_prompts)} alternative prompts")
    device = components.device
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    unet = lora_unet(components.unet, text_map, rank, seed)
    base = components.unet
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr)

    states = encode(components.text_encoder, tokenize(components.tokenizer, prompts)[0]).to(device, unet.dtype)
    alternatives = encode(components.text_encoder, tokenize(components.tokenizer, alternative_prompts)[0])
    alternatives = alternatives.to(device, unet.dtype)
    empty = empty_prompt_states(components)[None].to(components.device, unet.dtype)
    latents = encode_images(components, images).to(unet.dtype) if steps else None  # no step, no image read
    scheduler = components.scheduler
    t_weights = timestep_weights(scheduler.config.num_train_timesteps, importance_sampling)

    losses = []
    for step in range(steps):
        _, j, t, noisy = noisy_sample(latents, len(prompts), t_weights, scheduler, rng, generator)
        pair = torch.cat([noisy, noisy])  # the conditional and the unconditional prediction in one call
        new = unet(pair, t, encoder_hidden_states=torch.cat([states[j : j + 1], empty])).sample
        new_cond, new_uncond = predicted_noise(scheduler, new, pair, t).chunk(2)
        with torch.no_grad():
            old = base(pair, t, encoder_hidden_states=torch.cat([alternatives[j : j + 1], empty])).sample
            old_alt, old_uncond = predicted_noise(scheduler, old, pair, t).chunk(2)
        guidance = ((new_cond - new_uncond) - (old_alt - old_uncond)).pow(2).mean()
        drift = (new_uncond - old_uncond).pow(2).mean()
        loss = guidance + drift_weight * drift
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, steps)

    factors, state = exported_lora(unet)
    return factors, state, losses
