"""SepME's per-concept increment: a K/V edit that cannot touch the unconditional prediction.

Every cross-attention key/value projection ``W`` (d_out, d) gets an increment

    dW = alpha @ (scale * B)

where the rows of ``B`` (r, d) are an orthonormal basis of the null space of the empty
prompt's text states ``E`` (L, d), and only ``alpha`` (d_out, r) is trained. ``dW e = 0`` for
every state ``e`` of "", so the unconditional prediction, which every guided sample is built
on, is the base model's exactly; and increments of different concepts are separate terms
that ``erasure.methods.fusion.separable_weights`` adds or drops independently.

The loss is SepME's decorrelation of the guidance direction: with ``eps'`` the base UNet
plus the increments and ``eps`` the frozen base,

    loss = mean((eps'(x_t, c) - eps(x_t, "")) * (eps(x_t, c) - eps(x_t, ""))) + l1 * sum_W |dW|

i.e. the new guidance direction is pushed off the concept's original one (its
correlation, positive at the start, is driven to zero or below), while the L1 term keeps
the increment sparse and small. Training stops early once the 0.9-EMA of the loss is below
``stop_below``; Adam.

The null space: the orthogonal complement of the span of ``E`` (singular values above 1e-9
of the largest count as used), so the unconditional prediction is untouched to rounding, not
approximately. Text encoders give fewer states than dimensions (L < d: SD 1.x 77 < 768), so
it is not empty there.

At fusion (``separable_weights``) each increment is projected once more, on the null space of
the prior and of the other concepts' states: that is where SepME's separability comes from,
and doing it at fusion keeps a concept's artifact independent of the other concepts.

Settings (a request's ``method.separable_lr``, ``separable_scale``, ``separable_l1``,
``separable_stop_below``): ``lr = 0.1`` is the paper's; ``scale`` is 1e-3, not the paper's 1e-4 (which was
chosen for SD). Within our step budget (``method.lora_steps``, 50 by default) 1e-4 hardly moves
anything: on ``builtin:toyworld``, 50 steps changed the concept prompts' K/V by 1.3% and
lowered the decorrelation loss on fixed noise by 2%; 1e-3 changed them by 25% and lowered
it by 39%, the empty prompt's K/V untouched to 1e-8; 1e-2 overshot (the guidance direction
reversed, the conditional prediction moved by 5x the guidance's size). Each entry of
``alpha`` moves by about ``lr`` per Adam step, so ``dW``'s left factor by about
``lr * scale``; on SD, start from the paper's ``method.separable_scale: 1e-4``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from erasure.core.attention import cross_attention_projections
from erasure.core.closed_form import DTYPE
from erasure.core.text import empty_prompt_states, encode, tokenize
from erasure.diffusion.lora import noisy_sample, timestep_weights
from erasure.diffusion.sampling import encode_images, predicted_noise
from erasure.methods.constrained import null_space_dimension, null_space_projector
from erasure.spec import RequestError

log = logging.getLogger(__name__)


def empty_prompt_null_basis(components) -> torch.Tensor:
    """(r, d) float64, orthonormal rows: the directions of text space that no state of "" has
    any component along: the orthogonal complement of their span (see the module docstring)."""
    states = empty_prompt_states(components)  # (L, d)
    _, singular, vh = torch.linalg.svd(states, full_matrices=True)
    rank = int((singular > 1e-9 * singular.max()).sum())
    basis = vh[rank:].contiguous()
    if not len(basis):
        raise RequestError(
            "the empty prompt's text states span the whole text space: there is no direction SepME's increment "
            "could use without moving the unconditional prediction"
        )
    return basis


def train_separable_increment(
    components,
    images: torch.Tensor,
    prompts: list[str],
    steps: int,
    importance_sampling: bool,
    seed: int,
    on_step=None,
    lr: float = 0.1,
    scale: float = 1e-3,
    l1: float = 1e-6,
    stop_below: float = 1e-4,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], list[float]]:
    """Train one concept's SepME increment on the base model in ``components`` (left unchanged).

    ``prompts``: the concept's (augmented) prompts; ``images``: its images, in [0, 1].
    Returns (factors {projection: (up (d_out, r), down (r, d))} with ``up @ down == dW``
    exactly, the same as a diffusers-format LoRA state dict (rank r = the null space's
    dimension; ``erasure.diffusion.lora.save_lora`` writes it), the loss per step). Fewer than
    ``steps`` losses when the early stop fired. ``scale``: see the module docstring.
    """
    device = components.device
    unet = components.unet
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)

    projections = cross_attention_projections(unet)
    parameter_names = {id(p): n for n, p in unet.named_parameters()}
    weight_keys = {name: parameter_names[id(projection.weight)] for name, projection in projections.items()}
    # the base weights, detached: the UNet runs with its own parameters swapped out for these
    # (plus the increments), so no gradient reaches it whatever its requires_grad says
    frozen = {n: p.detach() for n, p in unet.named_parameters()}
    down = empty_prompt_null_basis(components).to(device, unet.dtype)
    alphas = {
        name: torch.zeros(projection.weight.shape[0], len(down), device=device, requires_grad=True)
        for name, projection in projections.items()
    }
    optimizer = torch.optim.Adam(list(alphas.values()), lr=lr)

    def increments() -> dict[str, torch.Tensor]:
        return {name: (alpha * scale).to(unet.dtype) @ down for name, alpha in alphas.items()}

    states = encode(components.text_encoder, tokenize(components.tokenizer, prompts)[0]).to(device, unet.dtype)
    empty = empty_prompt_states(components)[None].to(device, unet.dtype)
    latents = encode_images(components, images).to(unet.dtype) if steps else None  # no step, no image read
    scheduler = components.scheduler
    t_weights = timestep_weights(scheduler.config.num_train_timesteps, importance_sampling)

    losses: list[float] = []
    average = None
    for step in range(steps):
        _, j, t, noisy = noisy_sample(latents, len(prompts), t_weights, scheduler, rng, generator)
        with torch.no_grad():
            pair = torch.cat([noisy, noisy])
            base = unet(pair, t, encoder_hidden_states=torch.cat([states[j : j + 1], empty])).sample
            base_cond, base_uncond = predicted_noise(scheduler, base, pair, t).chunk(2)
        deltas = increments()
        weights = frozen | {weight_keys[n]: frozen[weight_keys[n]] + delta for n, delta in deltas.items()}
        output = functional_call(unet, weights, (noisy, t), {"encoder_hidden_states": states[j : j + 1]}).sample
        new_cond = predicted_noise(scheduler, output, noisy, t)
        decorrelation = ((new_cond - base_uncond) * (base_cond - base_uncond)).mean()
        loss = decorrelation + l1 * sum(d.abs().sum() for d in deltas.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        average = losses[-1] if average is None else 0.9 * average + 0.1 * losses[-1]
        if on_step is not None:
            # an early stop reports the whole budget done, so progress bars close
            on_step(steps if average < stop_below else step + 1, steps)
        if average < stop_below:
            break

    factors = {name: ((alpha.detach() * scale).to(unet.dtype).cpu(), down.cpu()) for name, alpha in alphas.items()}
    state = {}
    for name, (up, basis) in factors.items():
        state[f"{name}.lora.down.weight"] = basis.clone().contiguous()  # one tensor per key: safetensors refuses shared ones
        state[f"{name}.lora.up.weight"] = up.clone().contiguous()
    return factors, state, losses


# --------------------------------------------------------------------------- fusion


@dataclass
class SeparableCapacity:
    concept: str
    null_dimension: int
    kept: float  # the fraction of the increment's effect on its own states left after projection


MIN_KEPT = 0.25  # below it, an increment has lost most of its effect: the null space has run out


def separable_projectors(
    concepts: Sequence, prior_gram: torch.Tensor, invariants: torch.Tensor, threshold: float
) -> list[torch.Tensor]:
    """Per concept, the projector on the null space of the prior (retained concepts, captions,
    anchors), the empty prompt's states and the *other* concepts' states: eigenvalues of the sum
    of their Grams below ``threshold`` times the largest; the empty prompt's span removed exactly."""
    grams = [c.statistics.gram for c in concepts]
    total = sum(grams, torch.zeros_like(grams[0])) + prior_gram + invariants.T @ invariants / len(invariants)
    return [null_space_projector(total - g, threshold, invariants) for g in grams]


def separable_weights(
    base: dict[str, torch.Tensor],
    concepts: Sequence,
    prior_gram: torch.Tensor,
    invariants: torch.Tensor,
    threshold: float,
) -> dict[str, torch.Tensor]:
    """SepME's fusion: ``W* = W + sum_k dW_k P_k``. Each term is exactly zero on the empty prompt
    and on the prior's and every other concept's dominant states. ``P_k`` depends on the other
    concepts, so a restore re-fuses the remaining set (as every restore does); it does not just
    drop a term. When the others fill the text space an increment loses its effect: that is the
    method's capacity limit, raised as an error rather than fused as silent damage."""
    projectors = separable_projectors(concepts, prior_gram, invariants, threshold)
    weights = {n: w.to(DTYPE).clone() for n, w in base.items()}
    report = []
    for index, (concept, projector) in enumerate(zip(concepts, projectors)):
        own, kept = 0.0, 0.0
        gram = concept.statistics.gram
        for name, (up, down) in concept.factors.items():
            delta = up.to(DTYPE) @ down.to(DTYPE)
            projected = delta @ projector
            own += float(torch.trace(delta @ gram @ delta.T))
            kept += float(torch.trace(projected @ gram @ projected.T))
            weights[name] += projected
        label = concept.concept.name if hasattr(concept, "concept") else f"#{index}"
        report.append(SeparableCapacity(label, null_space_dimension(projector), (kept / own) ** 0.5 if own > 0 else 0.0))
    starved = [r for r in report if r.kept < MIN_KEPT]
    if starved:
        worst = min(starved, key=lambda r: r.kept)
        raise RequestError(
            f"SepME's capacity is exhausted: {len(starved)} of {len(concepts)} concepts keep less than "
            f"{MIN_KEPT:.0%} of their increment once confined to the null space of the retained states and the other "
            f"concepts (worst: {worst.concept!r}, {worst.kept:.1%}, null space {worst.null_dimension} dimensions); "
            "erase fewer concepts with fusion.method: separable, or use fusion.method: constrained"
        )
    for r in report:
        log.info("SepME %s: null space %d dims, %.1f%% of its increment kept", r.concept, r.null_dimension, 100 * r.kept)
    return {n: w.to(base[n].dtype) for n, w in weights.items()}
