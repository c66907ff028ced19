"""RealEra's neighbour mining: states inside the band are erased, states beyond it kept."""

import torch

from erasure.methods.mining import candidate_words, states_at_cosine, text_neighbours


def test_perturbed_states_keep_their_norm_and_lie_inside_the_band():
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(7, 32, generator=gen, dtype=torch.float64) * 3
    near = states_at_cosine(states, 0.5, 0.9, 5, gen)
    origin = states.repeat_interleave(5, dim=0)
    cosine = torch.nn.functional.cosine_similarity(near, origin, dim=1)
    assert near.shape == (35, 32)
    assert cosine.min() >= 0.5 - 1e-9 and cosine.max() <= 0.9 + 1e-9
    assert cosine.max() - cosine.min() > 0.2  # spread over the band, not one point
    assert torch.allclose(near.norm(dim=1), origin.norm(dim=1))
    beyond = states_at_cosine(states, 0.0, 0.499, 2, gen)
    assert torch.nn.functional.cosine_similarity(beyond, states.repeat_interleave(2, dim=0), dim=1).max() < 0.5


def test_text_neighbours_are_inside_the_band_and_never_excluded_words(tiny):
    from erasure.core.text import encode_prompts

    words = candidate_words(tiny.tokenizer)
    assert words and all(w.isalpha() and len(w) >= 3 for w in words)
    template = "a photo of the {}"
    ids = tiny.tokenizer(template.replace("{}", "cat"), padding="max_length", max_length=tiny.tokenizer.model_max_length)
    length = sum(ids["attention_mask"])
    concept_state = encode_prompts(tiny, [template.replace("{}", "cat")])[0, length - 2]
    found = text_neighbours(tiny, template, concept_state, (-1.0, 0.999), 5, {"cat", words[0]}, words)
    assert 0 < len(found) <= 5 and words[0] not in [w for w, _ in found] and "cat" not in [w for w, _ in found]
    states = encode_prompts(tiny, [template.replace("{}", w) for w, _ in found])
    for (word, cosine), state in zip(found, states):
        recomputed = torch.nn.functional.cosine_similarity(state[length - 2].double(), concept_state.double(), dim=0)
        assert abs(float(recomputed) - cosine) < 1e-5, word
    assert [c for _, c in found] == sorted((c for _, c in found), reverse=True)
    narrow = text_neighbours(tiny, template, concept_state, (0.2, 0.3), 50, set(), words)
    assert all(0.2 <= c <= 0.3 for _, c in narrow)


def test_a_perturbed_neighbour_is_erased_as_the_concept_it_came_from():
    """The fusion maps a mined neighbour to its source's target, not through the concept's maps
    (which would pin the edit to zero on every direction the neighbours add)."""
    from erasure.core.closed_form import DTYPE, ConceptStatistics, FusionAccumulator, gram
    from erasure.methods.mining import with_perturbed_neighbours
    from erasure.spec import MiningSettings

    dim, out = 16, 5
    gen = torch.Generator().manual_seed(1)
    span = torch.randn(3, dim, generator=gen, dtype=DTYPE)
    stats = ConceptStatistics(gram(span[None]), gram(span[None]), gram(span[None]), torch.zeros(dim, dim, dtype=DTYPE), 3)
    mining = MiningSettings(perturbed_per_state=2)
    mined = with_perturbed_neighbours(stats, span, mining, seed=7)
    near = states_at_cosine(span, *mining.band, 2, torch.Generator().manual_seed(7))
    w = torch.randn(out, dim, generator=gen, dtype=DTYPE)
    up, down = torch.randn(out, 1, generator=gen, dtype=DTYPE), torch.randn(1, dim, generator=gen, dtype=DTYPE)
    accumulator = FusionAccumulator(dim, {"layer": (out, dim)})
    accumulator.add(mined, torch.eye(dim, dtype=DTYPE), {"layer": (up, down)})
    fused = accumulator.fuse({"layer": w}, torch.zeros(dim, dim, dtype=DTYPE), lam2=0.0, ridge=1e-12)["layer"]
    target = (w + up @ down) @ span.T  # the concept states' own targets
    assert torch.allclose(fused @ span.T, target, atol=1e-6)
    assert torch.allclose(fused @ near.T, target.repeat_interleave(2, dim=1), atol=1e-6)
