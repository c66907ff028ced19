"""Attacks on erased models: their plumbing on the tiny model, the embedding hook on the toy world's
MiniLM encoder, and the sampling path they draw through."""

import random

import pytest
import torch

from erasure.audit import attacks
from erasure.core.text import encode_prompts, tokenize
from erasure.diffusion.models import TINY_EXTRA_WORDS
from erasure.diffusion.sampling import sample, sample_from_states

WORDS = ["cat", "dog", "tree", "house", "boat"]


@pytest.fixture(scope="module")
def reference():
    """Four 16x16 'images of the concept' (the tiny model draws noise; any images will do)."""
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _placeholder_states(components, template, placeholder, vector):
    ids, _ = tokenize(components.tokenizer, [template.replace("{}", placeholder)])
    placeholder_id = components.tokenizer(placeholder, add_special_tokens=False)["input_ids"][0]
    embeddings = components.text_encoder.get_input_embeddings()
    with torch.no_grad(), attacks.injected_embeddings(components.text_encoder, lambda b: b == placeholder_id, vector):
        injected = embeddings(ids)
        states = encode_prompts(components, [template.replace("{}", placeholder)])
    return ids, placeholder_id, embeddings(ids).detach(), injected, states


def test_injected_embedding_replaces_only_the_placeholder_positions(tiny):
    vector = torch.randn(tiny.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids, placeholder_id, plain, injected, states = _placeholder_states(tiny, "a photo of the {} and a {}", "boat", vector)
    at = ids == placeholder_id
    assert int(at.sum()) == 2
    assert torch.equal(injected[~at], plain[~at])
    assert torch.equal(injected[at], vector.expand(2, -1))
    # the causal CLIP encoder: the states before the first placeholder are untouched, from it on they move
    first = int(at[0].nonzero()[0])
    before = encode_prompts(tiny, ["a photo of the boat and a boat"])
    assert torch.equal(states[0, :first], before[0, :first])
    assert not torch.allclose(states[0, first], before[0, first])
    # the hook is gone once the block closes
    assert torch.equal(tiny.text_encoder.get_input_embeddings()(ids), plain)


def test_injecting_a_words_own_embedding_reproduces_its_prompt_on_the_minilm_world():
    from erasure.loading import load_components

    world = load_components("builtin:toyworld")
    red = world.text_encoder.get_input_embeddings().weight[world.tokenizer("red", add_special_tokens=False)["input_ids"][0]]
    ids, placeholder_id, plain, injected, states = _placeholder_states(world, "a photo of the {} circle", "leo", red.detach())
    at = ids == placeholder_id
    assert torch.equal(injected[~at], plain[~at]) and int(at.sum()) == 1
    # BERT's position embeddings and layer norm come after the hook: the states are the prompt's own
    torch.testing.assert_close(states, encode_prompts(world, ["a photo of the red circle"]), rtol=0, atol=1e-5)


def test_concept_inversion_lowers_its_loss_and_draws_from_its_states(tiny, reference):
    before = {name: p.detach().clone() for name, p in tiny.unet.named_parameters()}
    output = attacks.concept_inversion(tiny, reference, initializer="dog", steps=25, lr=5e-2, batch_size=2)
    assert output.details["final_loss"] < output.details["initial_loss"]
    assert output.details["placeholder"] not in " ".join(attacks.INVERSION_TEMPLATES) + " dog"
    assert output.states.shape == (len(attacks.INVERSION_TEMPLATES), 16, 32)
    assert output.embedding.shape == (32,) and len(output.scores) == len(output.prompts)
    assert all(attacks.LEARNED_TOKEN in p for p in output.prompts)
    # only the embedding was trained: the target is as it was, and holds no gradients
    assert all(torch.equal(p, before[name]) and p.grad is None for name, p in tiny.unet.named_parameters())

    images = attacks.attack_images(tiny, output, seeds=[0, 1, 2], steps=2, guidance_scale=2.0)
    expected = sample_from_states(tiny, output.states[:3], [0, 1, 2], 2, 2.0)
    assert torch.equal(images, expected)


def _brute_force_losses(components, reference, prompts, draws, seed):
    """The denoising loss of each prompt on its own, on the draws prefix_search makes for ``seed``."""
    latents = attacks.reference_latents(components, reference)
    fixed = attacks.denoising_draws(
        latents, components.scheduler.config.num_train_timesteps, draws, torch.Generator().manual_seed(seed)
    )
    losses = []
    for prompt in prompts:
        states = encode_prompts(components, [prompt]).expand(draws, -1, -1)
        with torch.no_grad():
            losses.append(float(attacks.denoising_loss(components, latents, fixed, states).mean()))
    return losses


def test_exhaustive_prefix_search_finds_the_true_minimum_and_is_deterministic(tiny, reference):
    kwargs = {"prompt": "a photo of the cat", "vocabulary": WORDS[1:], "prefix_length": 2, "draws": 3, "top_k": 16}
    output = attacks.prefix_search(tiny, reference, seed=7, **kwargs)
    assert output.details["method"] == "exhaustive" and output.details["candidates"] == 16

    prompts = [f"{a} {b} a photo of the cat" for a in WORDS[1:] for b in WORDS[1:]]
    losses = _brute_force_losses(tiny, reference, prompts, draws=3, seed=7)
    assert output.prompts[0] == prompts[min(range(len(prompts)), key=losses.__getitem__)]
    assert sorted(output.prompts) == sorted(prompts)
    for prompt, score in zip(output.prompts, output.scores):
        assert score == pytest.approx(losses[prompts.index(prompt)], rel=1e-4)
    assert output.scores == sorted(output.scores)

    again = attacks.prefix_search(tiny, reference, seed=7, **kwargs)
    assert (again.prompts, again.scores) == (output.prompts, output.scores)


def test_straight_through_prefix_search_returns_vocabulary_words(tiny, reference):
    vocabulary = [w for w in TINY_EXTRA_WORDS if w != "cat"]
    output = attacks.prefix_search(
        tiny, reference, "a photo of the cat", vocabulary, prefix_length=2, exclude=["boat"],
        steps=4, batch_size=2, draws=2, exhaustive_limit=10,
    )
    assert output.details["method"] == "straight-through"
    for prompt in output.prompts:
        prefix = prompt.removesuffix(" a photo of the cat").split()
        assert len(prefix) == 2 and all(w in vocabulary and w != "boat" for w in prefix)


def test_ring_a_bell_excludes_the_concepts_words_and_beats_a_random_prompt(tiny):
    pairs = attacks.prompt_pairs("cat", ["a {} in a room", "a photo of the {} tree", "a small {}"])
    assert pairs[0] == ("a cat in a room", "a in a room")
    vocabulary = list(TINY_EXTRA_WORDS)
    output = attacks.ring_a_bell(
        tiny, pairs, "a photo of a dog", vocabulary, exclude=["cat", "kitty cat"], eta=2.0, length=4,
        population=16, generations=6, seed=3,
    )
    assert output.prompts and all("cat" not in p.split() for p in output.prompts)
    assert output.scores == sorted(output.scores)

    goal = encode_prompts(tiny, ["a photo of a dog"])[0] + 2.0 * attacks.concept_vector(tiny, pairs)
    found = float((encode_prompts(tiny, output.prompts[:1])[0] - goal).norm())
    assert found == pytest.approx(output.scores[0], rel=1e-5)
    rng = random.Random(0)
    usable = [w for w in vocabulary if w != "cat"]
    randoms = [" ".join(rng.choice(usable) for _ in range(4)) for _ in range(8)]
    random_distances = (encode_prompts(tiny, randoms) - goal).flatten(1).norm(dim=1)
    assert found <= float(random_distances.min())


def test_sampling_from_states_is_sampling_from_prompts(tiny):
    prompts = ["a photo of the cat", "a dog", "", "a red tree", "a house"]
    seeds = [3, 1, 4, 1, 5]
    states = encode_prompts(tiny, prompts)
    for guidance in (1.0, 3.0):
        images, _ = sample(tiny, prompts, seeds, 3, guidance, batch_size=2)
        assert torch.equal(sample_from_states(tiny, states, seeds, 3, guidance, batch_size=2), images)
    # a discrete attack's prompts are drawn as prompts, cycled over the seeds
    output = attacks.AttackOutput("prefix_search", prompts[:2], [0.1, 0.2])
    images, _ = sample(tiny, [prompts[0], prompts[1], prompts[0]], [7, 8, 9], 3, 3.0)
    assert torch.equal(attacks.attack_images(tiny, output, [7, 8, 9], 3, 3.0), images)


def test_bad_input_says_what_to_fix(tiny, reference):
    with pytest.raises(ValueError, match="vocabulary is empty"):
        attacks.prefix_search(tiny, reference, "a cat", [])
    with pytest.raises(ValueError, match="vocabulary is empty"):
        attacks.ring_a_bell(tiny, [("a cat", "a")], "a dog", ["cat"], exclude=["cat"])
    with pytest.raises(ValueError, match="steps must be at least 1"):
        attacks.concept_inversion(tiny, reference, "dog", steps=0)
    with pytest.raises(ValueError, match="generations must be at least 1"):
        attacks.ring_a_bell(tiny, [("a cat", "a")], "a dog", WORDS, generations=0)
    for empty in (torch.empty(0, 3, 16, 16), None):
        with pytest.raises(ValueError, match="reference_images must be a non-empty"):
            attacks.concept_inversion(tiny, empty, "dog")
        with pytest.raises(ValueError, match="reference_images must be a non-empty"):
            attacks.prefix_search(tiny, empty, "a cat", WORDS)
    with pytest.raises(ValueError, match="at least one"):
        attacks.concept_vector(tiny, [])
    with pytest.raises(ValueError, match="'\\{\\}'"):
        attacks.concept_inversion(tiny, reference, "dog", templates=("a photo",))
    with pytest.raises(ValueError, match="nothing to draw"):
        attacks.attack_images(tiny, attacks.AttackOutput("x", [], []), [0], 2, 1.0)
