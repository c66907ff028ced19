import torch
from diffusers import StableDiffusionPipeline

from erasure.core.attention import cross_attention_projections, probing
from erasure.core.closed_form import DTYPE
from erasure.core.text import encode, tokenize
from erasure.diffusion.data import attention_masks, concept_token_span
from erasure.diffusion.lora import (
    focal_timestep_weights,
    masked_attention_loss,
    refined_unet,
    save_lora,
    train_concept_lora,
)
from erasure.diffusion.sampling import encode_images, sample
from erasure.erase import concept_text
from erasure.spec import ConceptSpec


def test_focal_sampling_concentrates_on_200_to_400():
    weights = focal_timestep_weights(1000)
    assert abs(float(weights.sum()) - 1) < 1e-9
    assert float(weights[200:400].sum()) > 0.75
    assert int(weights.argmax()) in range(250, 350)


def fixed_loss(components, unet, latents, masks, states, span):
    """Masked attention loss of ``unet`` at fixed timesteps and noise (an evaluation, not a training step)."""
    total = 0.0
    generator = torch.Generator().manual_seed(123)
    with probing(unet) as probe, torch.no_grad():
        recorded = []
        probe.listener = lambda name, probs: recorded.append((name, probs))
        probe.token_index = torch.tensor([span])
        for t in (250, 300, 350):
            for i in range(len(latents)):
                recorded.clear()
                noise = torch.randn(latents[i : i + 1].shape, generator=generator)
                noisy = components.scheduler.add_noise(latents[i : i + 1], noise, torch.tensor([t]))
                unet(noisy, torch.tensor([t]), encoder_hidden_states=states)
                total += float(masked_attention_loss(recorded, masks[i : i + 1]))
    return total


def test_lora_lowers_masked_attention_loss_and_loads_in_diffusers(tiny, tiny_folder, tmp_path):
    concept = ConceptSpec(name="cat", anchor="dog")
    text = concept_text(tiny, concept, prompt_count=6, seed=0)
    prompt = "a photo of the cat"
    span = concept_token_span(tiny.tokenizer, prompt, "cat", "dog")
    images, maps = sample(tiny, [prompt] * 2, [0, 1], steps=3, guidance_scale=3.0, record_tokens=torch.tensor([span] * 2))
    masks = attention_masks(maps, 0.5)
    assert masks.any() and not masks.all()

    identity = torch.eye(tiny.text_encoder.config.hidden_size, dtype=DTYPE)
    factors, state, losses = train_concept_lora(
        tiny, identity, images, masks, text.prompts, text.spans,
        rank=1, lr=5e-2, steps=25, importance_sampling=True, seed=0,
    )
    assert len(losses) == 25
    assert set(factors) == set(cross_attention_projections(tiny.unet))  # every attn2 to_k / to_v
    assert all(up.shape[1] == 1 and down.shape[0] == 1 for up, down in factors.values())

    # evaluate on fixed noise: the trained LoRA lowers the masked attention of the concept tokens
    ids, _ = tokenize(tiny.tokenizer, [prompt])
    states = encode(tiny.text_encoder, ids)
    latents = encode_images(tiny, images)
    before = fixed_loss(tiny, tiny.unet, latents, masks, states, span)
    trained = refined_unet(tiny.unet, identity)
    for name, projection in trained.named_modules():
        if name in factors:
            up, down = factors[name]
            projection.weight.data += up @ down
    after = fixed_loss(tiny, trained, latents, masks, states, span)
    assert after < 0.8 * before

    # the saved file is an ordinary diffusers LoRA
    save_lora(state, tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None, local_files_only=True)
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, output_type="pt", height=16, width=16)
    plain = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path / "lora")
    erased = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (plain - erased).abs().max() > 1e-4
