import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline

from erasure.core.attention import cross_attention_projections
from erasure.core.text import encode_prompts
from erasure.diffusion.lora import load_lora_factors, lora_factors, save_lora
from erasure.diffusion.sampling import encode_images
from erasure.methods.separable import empty_prompt_null_basis, train_separable_increment

PROMPTS = ["a photo of the cat", "a painting of the cat", "the cat", "a cat"]
SCALE = 1e-2  # the tiny model's K/V and text states are small: 1e-3 would lower its loss by 5% only


@pytest.fixture(scope="module")
def trained(tiny):
    """One training run shared by the tests, with the base UNet as it was before it."""
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    factors, state, losses = train_separable_increment(
        tiny, images, PROMPTS, steps=40, importance_sampling=True, seed=0, scale=SCALE
    )
    return before, images, factors, state, losses


def merged(components, factors):
    unet = copy.deepcopy(components.unet)
    projections = cross_attention_projections(unet)
    for name, (up, down) in factors.items():
        projections[name].weight.data += up @ down
    return unet


def test_the_increment_is_zero_on_the_empty_prompt_and_not_on_the_concept(tiny, trained):
    _, _, factors, _, _ = trained
    empty = encode_prompts(tiny, [""])[0]  # (L, d)
    concept = encode_prompts(tiny, PROMPTS).flatten(0, 1)
    projections = cross_attention_projections(tiny.unet)
    assert set(factors) == set(projections)
    basis = empty_prompt_null_basis(tiny)
    torch.testing.assert_close(basis @ basis.T, torch.eye(len(basis), dtype=basis.dtype))
    moved = []
    for name, (up, down) in factors.items():
        delta, weight = up @ down, projections[name].weight.data
        leak = (delta @ empty.T).norm(dim=0) / (weight @ empty.T).norm(dim=0)  # per state of ""
        assert float(leak.max()) < 1e-6, name
        moved.append(float((delta @ concept.T).norm() / (weight @ concept.T).norm()))
    assert max(moved) > 1e-2  # not a negligible increment: it does move the concept's K/V


def test_the_base_unet_is_unchanged_and_got_no_gradient(tiny, trained):
    before = trained[0]
    after = tiny.unet.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert all(p.grad is None for p in tiny.unet.parameters())


@torch.no_grad()
def decorrelation(components, unet, latents):
    """SepME's loss (without L1) at fixed noise and timesteps, and the largest relative change
    of the unconditional prediction."""
    generator = torch.Generator().manual_seed(7)
    concept, empty = encode_prompts(components, PROMPTS), encode_prompts(components, [""])
    total, uncond_change = 0.0, 0.0
    for t in (100, 300, 500, 700):
        for i in range(len(latents)):
            noisy = components.scheduler.add_noise(latents[i : i + 1], torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([t]))
            base_uncond = components.unet(noisy, t, encoder_hidden_states=empty).sample
            uncond = unet(noisy, t, encoder_hidden_states=empty).sample
            uncond_change = max(uncond_change, float((uncond - base_uncond).norm() / base_uncond.norm()))
            for j in range(len(PROMPTS)):
                base_cond = components.unet(noisy, t, encoder_hidden_states=concept[j : j + 1]).sample
                cond = unet(noisy, t, encoder_hidden_states=concept[j : j + 1]).sample
                total += float(((cond - base_uncond) * (base_cond - base_uncond)).mean())
    return total, uncond_change


def test_training_lowers_the_loss_and_keeps_the_unconditional_prediction(tiny, trained):
    _, images, factors, _, losses = trained
    assert len(losses) == 40  # no early stop at this scale
    latents = encode_images(tiny, images)
    before, _ = decorrelation(tiny, tiny.unet, latents)
    after, uncond_change = decorrelation(tiny, merged(tiny, factors), latents)
    assert before > 0
    assert after < 0.7 * before  # measured: 0.51 of it
    assert uncond_change < 1e-5  # float32 rounding of W + dW, nothing more


def test_early_stop_once_the_loss_average_is_low(tiny):
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reported = []
    _, _, losses = train_separable_increment(
        tiny, images, PROMPTS[:1], steps=10, importance_sampling=False, seed=0, stop_below=1.0,
        on_step=lambda done, total: reported.append((done, total)),
    )
    assert len(losses) == 1 and reported == [(10, 10)]


def test_factors_round_trip_and_load_as_a_diffusers_lora(tiny, tiny_folder, trained, tmp_path):
    _, _, factors, state, _ = trained
    rank = len(empty_prompt_null_basis(tiny))
    assert all(up.shape[1] == rank and down.shape[0] == rank for up, down in factors.values())
    for parsed in (lora_factors(state), load_lora_factors(save_lora(state, tmp_path / "lora").parent)):
        assert parsed.keys() == factors.keys()
        for name, (up, down) in factors.items():
            assert torch.equal(parsed[name][0], up) and torch.equal(parsed[name][1], down), name

    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None, local_files_only=True)
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, output_type="pt", height=16, width=16)

    def generate(prompt):
        return pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images

    plain_empty, plain_cat = generate(""), generate(PROMPTS[0])
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(generate(""), plain_empty, rtol=0, atol=1e-5)  # "" reads none of the increment
    assert float((generate(PROMPTS[0]) - plain_cat).abs().max()) > 1e-4


def test_sepmes_hyperparameters_are_settings_that_reach_its_training(tiny, monkeypatch):
    import erasure.erase as erase_module
    from erasure.spec import parse_request

    request = parse_request({
        "model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}], "fusion": {"method": "separable"},
        "method": {"objective": "separable", "separable_lr": 0.05, "separable_scale": 2e-3, "separable_l1": 0.0,
                   "separable_stop_below": 0.0, "images_per_concept": 1, "sampler_steps": 2, "prompts_per_concept": 2},
    })
    request = erase_module.prepare_request(request, tiny)
    seen = {}

    def train(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(erase_module, "train_separable_increment", train)
    prior = erase_module.prior_statistics(tiny, erase_module.prior_prompts(request.preserve))
    with pytest.raises(RuntimeError, match="stop here"):
        erase_module.erase_concept(tiny, request.concepts[0], request, prior)
    assert (seen["lr"], seen["scale"], seen["l1"], seen["stop_below"]) == (0.05, 2e-3, 0.0, 0.0)
