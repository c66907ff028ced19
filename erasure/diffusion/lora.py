"""One LoRA per concept, trained to remove the concept tokens' attention on the concept's pixels.

docs/method.md, "LoRA on attention": rank-r LoRA (peft) on every ``attn2.to_k`` and ``attn2.to_v``;
loss ``sum over layers of || A_l[:, mask, concept tokens] ||_F`` (the reference
code's unsquared norm: its gradient does not vanish as the attention shrinks,
which the squared norm of the paper's text does); timesteps drawn by
concept-focal importance sampling; batch 1, AdamW.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from erasure.core.attention import cross_attention_projections, probing, resize_mask
from erasure.core.closed_form import apply_text_map
from erasure.core.text import encode, tokenize
from erasure.diffusion.sampling import encode_images

LORA_FILE = "pytorch_lora_weights.safetensors"
TARGET_MODULES = ["attn2.to_k", "attn2.to_v"]


def focal_timestep_weights(num_train_timesteps: int) -> torch.Tensor:
    """Concept-focal importance sampling density over timesteps (MACE):
    ``p(t) ∝ sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400))``, with t measured
    on a 1000-step scale so models with other schedules keep the same focus."""
    t = torch.arange(num_train_timesteps, dtype=torch.float64) * (1000.0 / num_train_timesteps)
    weights = torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))
    return weights / weights.sum()


def refined_unet(unet, text_map: torch.Tensor):
    """A copy of ``unet`` with every cross-attention K/V projection W replaced by W M."""
    refined = copy.deepcopy(unet)
    for projection in cross_attention_projections(refined).values():
        projection.weight.data = apply_text_map(projection.weight.data, text_map)
    return refined


def masked_attention_loss(layer_probs: list[tuple[str, torch.Tensor]], masks: torch.Tensor) -> torch.Tensor:
    """``sum_l || A_l[:, mask, tokens] ||_F``; ``layer_probs``: (name, (b, heads, pixels, k))."""
    total = None
    for _, probs in layer_probs:
        keep = resize_mask(masks, probs.shape[2]).to(probs.device)  # (b, pixels)
        selected = probs * keep[:, None, :, None]
        norm = selected.pow(2).sum().clamp_min(1e-20).sqrt()
        total = norm if total is None else total + norm
    if total is None:
        raise RuntimeError("no cross-attention was recorded during the LoRA step")
    return total


def noisy_sample(latents: torch.Tensor, prompt_count: int, t_weights: torch.Tensor, scheduler, rng, generator):
    """One training draw, the same in every trainer: an image latent ``i``, a prompt ``j``, a
    timestep ``t`` and the latent noised to it."""
    i = rng.randrange(len(latents))
    j = rng.randrange(prompt_count)
    t = torch.multinomial(t_weights, 1, generator=generator).to(latents.device)
    noise = torch.randn(latents[i : i + 1].shape, generator=generator).to(latents.device, latents.dtype)
    return i, j, t, scheduler.add_noise(latents[i : i + 1], noise, t)


def train_concept_lora(
    components,
    text_map: torch.Tensor,
    images: torch.Tensor,
    masks: torch.Tensor,
    prompts: list[str],
    spans: list[tuple[int, ...]],
    rank: int,
    lr: float,
    steps: int,
    importance_sampling: bool,
    seed: int,
    on_step=None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], list[float]]:
    """Train one concept's LoRA on the model refined by that concept's CFR map ``text_map``.

    ``prompts``: augmented concept prompts; ``spans``: the concept's token
    positions in each. Returns (factors {projection: (up, down)}, the LoRA state
    dict in diffusers format, the loss per step).
    """
    device = components.device
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    unet = lora_unet(components.unet, text_map, rank, seed)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)

    ids, _ = tokenize(components.tokenizer, prompts)
    states = encode(components.text_encoder, ids).to(device, unet.dtype)
    latents = encode_images(components, images).to(unet.dtype) if steps else None  # no step, no image read
    scheduler = components.scheduler
    t_weights = timestep_weights(scheduler.config.num_train_timesteps, importance_sampling)

    losses = []
    with probing(unet) as probe:
        recorded: list[tuple[str, torch.Tensor]] = []
        probe.listener = lambda name, probs: recorded.append((name, probs))
        for step in range(steps):
            i, j, t, noisy = noisy_sample(latents, len(prompts), t_weights, scheduler, rng, generator)
            probe.token_index = torch.tensor([spans[j]])
            recorded.clear()
            unet(noisy, t, encoder_hidden_states=states[j : j + 1])
            loss = masked_attention_loss(recorded, masks[i : i + 1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, steps)
        recorded.clear()

    factors, state = exported_lora(unet)
    return factors, state, losses


def lora_unet(unet, text_map: torch.Tensor, rank: int, seed: int):
    """The refined copy of ``unet`` (``refined_unet``) with a fresh rank-``rank`` peft LoRA on every
    cross-attention K/V, in training mode; the LoRA's parameters are the only trainable ones."""
    refined = refined_unet(unet, text_map).train()
    refined.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
    torch.manual_seed(seed)  # peft's gaussian init of the down projection
    refined.add_adapter(config)
    return refined


def exported_lora(unet) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """(factors {projection: (up, down)}, the diffusers-format state dict) of ``lora_unet``'s adapter."""
    peft_state = get_peft_model_state_dict(unet)
    diffusers_state = convert_state_dict_to_diffusers(peft_state)
    return lora_factors(peft_state), {k: v.detach().cpu().contiguous() for k, v in diffusers_state.items()}


def timestep_weights(num_train_timesteps: int, importance_sampling: bool) -> torch.Tensor:
    """The training timesteps' density: concept-focal, or uniform."""
    if importance_sampling:
        return focal_timestep_weights(num_train_timesteps)
    return torch.full((num_train_timesteps,), 1.0 / num_train_timesteps)


def lora_factors(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{projection name: (up (d_out, r), down (r, d))} from a peft or diffusers LoRA state dict.

    Alpha equals rank in our LoRAs, so dW = up @ down exactly.
    """
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("unet.")
        for marker, role in ((".lora_A.", "down"), (".lora_B.", "up"), (".lora.down.", "down"), (".lora.up.", "up")):
            if marker in key:
                factors.setdefault(key.split(marker)[0], {})[role] = value.detach().cpu()
    return {name: (parts["up"], parts["down"]) for name, parts in sorted(factors.items())}


def save_lora(state: dict[str, torch.Tensor], folder: Path) -> Path:
    """Save in the diffusers LoRA format that ``pipe.load_lora_weights(folder)`` reads."""
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True)
    return Path(folder) / LORA_FILE


def load_lora_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return lora_factors(load_file(str(Path(folder) / LORA_FILE)))
