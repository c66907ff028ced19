"""Erasure metrics, each defined once (following MACE's evaluation).

Accuracies are fractions in [0, 1] of generated images that a judge (a
classifier) says show the concept a prompt asked for.
"""

from __future__ import annotations

import torch


def percent(value) -> str:
    """A fraction as a percentage for tables and reports; "–" for NaN (no probe of that kind)."""
    return "–" if value is None or value != value else f"{100 * value:.1f}"


def harmonic_o(acc_e: float, acc_s: float, acc_g: float) -> float:
    """Overall harmonic mean of MACE's object benchmark:

    ``H_o = 3 / (1 / (1 - acc_e) + 1 / acc_s + 1 / (1 - acc_g))``

    High when the erased concept is rarely drawn from its own name (acc_e low)
    or from synonyms (acc_g low) and retained concepts still are (acc_s high).
    Returns 0 when any term is 0 (a degenerate model).
    """
    terms = (1 - acc_e, acc_s, 1 - acc_g)
    if min(terms) <= 0:
        return 0.0
    return 3.0 / sum(1.0 / t for t in terms)


def harmonic_c(acc_e: float, acc_s: float) -> float:
    """MACE's celebrity harmonic mean ``H_c = 2 / (1 / (1 - acc_e) + 1 / acc_s)``."""
    terms = (1 - acc_e, acc_s)
    if min(terms) <= 0:
        return 0.0
    return 2.0 / sum(1.0 / t for t in terms)


def pixel_drift(erased: torch.Tensor, base: torch.Tensor) -> float:
    """Mean absolute pixel difference, in [0, 1], between images of the same prompts and seeds."""
    return float((erased.float() - base.float()).abs().mean())


@torch.no_grad()
def unconditional_drift(erased_components, base_components, samples: int = 16, seed: int = 0, steps: int | None = None) -> float:
    """Relative change of the unconditional noise prediction (All-but-One holds it still):

    ``|| eps_erased(x_t, "") - eps_base(x_t, "") || / || eps_base(x_t, "") ||``

    over random x_t at timesteps spread over the schedule, predictions compared as noise whatever
    the model predicts. A family's pipeline is measured on its images instead
    (``pipeline_unconditional_drift``, at ``steps``).
    """
    from erasure.architectures.base import LoadedPipeline
    from erasure.core.text import encode_prompts
    from erasure.diffusion.sampling import initial_noise, predicted_noise

    if isinstance(base_components, LoadedPipeline):
        return pipeline_unconditional_drift(erased_components, base_components, steps)

    num_t = base_components.scheduler.config.num_train_timesteps
    t = torch.linspace(num_t * 0.05, num_t * 0.95, samples).long()
    x = initial_noise(base_components, [seed * 1000 + i for i in range(samples)])
    device = base_components.device
    empty_base = encode_prompts(base_components, [""]).to(device).expand(samples, -1, -1)
    empty_erased = encode_prompts(erased_components, [""]).to(device).expand(samples, -1, -1)
    scheduler, t = base_components.scheduler, t.to(device)
    eps_base = predicted_noise(scheduler, base_components.unet(x, t, encoder_hidden_states=empty_base).sample, x, t)
    eps_erased = predicted_noise(scheduler, erased_components.unet(x, t, encoder_hidden_states=empty_erased).sample, x, t)
    return float((eps_erased - eps_base).norm() / eps_base.norm())


def pipeline_unconditional_drift(erased, base, steps: int | None = None, samples: int = 4, seed: int = 0) -> float:
    """A family's pipeline (``LoadedPipeline``): the relative change of what it draws for the
    empty prompt, ``|| x_erased - x_base || / || x_base ||`` over ``samples`` images drawn with the
    same seeds (``steps``: the audit's; None, the pipeline's own). What a pipeline draws when no
    concept is asked for is carried by its unconditional input at every step (SDXL's is zeros, its
    conditional half the empty prompt's states), so this sees every weight that moved it, edited
    map or not, where the maps' own outputs would not (zeros give zeros)."""
    seeds = [seed * 1000 + i for i in range(samples)]
    own_steps, guidance = base.sampler_defaults()
    before = base.sample([""] * samples, seeds, steps or own_steps, guidance).double()
    after = erased.sample([""] * samples, seeds, steps or own_steps, guidance).double()
    return float((after - before).norm() / before.norm().clamp_min(1e-12))
