"""RealEra's neighbour mining: states inside the band are erased, states beyond it kept."""

import torch

from erasure.mining import candidate_words, states_at_cosine, text_neighbours


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
    from erasure.text import encode_prompts

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
