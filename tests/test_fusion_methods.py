"""The fusion methods' defining properties: constrained, adversarial rounds, separable, token choice."""

from types import SimpleNamespace

import pytest
import torch

from erasure.core.closed_form import DTYPE, ConceptStatistics, FusionAccumulator, gram
from erasure.core.text import align_tokens
from erasure.methods.constrained import constrained_text_side, null_space_dimension, null_space_projector
from erasure.methods.fusion import adversarial_terms
from erasure.methods.separable import separable_projectors, separable_weights
from erasure.spec import ConceptSpec, RequestError

D, D_OUT = 16, 9
NO_PRIOR = torch.zeros(D, D, dtype=DTYPE)


def _concept(states: torch.Tensor, factors=None, text_map=None):
    class Concept:
        pass

    concept, dim = Concept(), states.shape[1]
    concept.statistics = ConceptStatistics(
        aligned_gram=gram(states[None]), aligned_cross=gram(states[None]), gram=gram(states[None]),
        anchor_gram=torch.zeros(dim, dim, dtype=DTYPE), anchor_count=0,
    )
    concept.text_map = torch.eye(dim, dtype=DTYPE) if text_map is None else text_map
    concept.factors = factors or {}
    return concept


def _setup(seed=0, retained_rank=6, concepts=3):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=DTYPE))[0]
    retained = torch.randn(40, retained_rank, generator=gen, dtype=DTYPE) @ basis[:, :retained_rank].T
    invariants = torch.randn(2, D, generator=gen, dtype=DTYPE)
    w = torch.randn(D_OUT, D, generator=gen, dtype=DTYPE)
    erased = []
    for _ in range(concepts):
        states = torch.randn(5, D, generator=gen, dtype=DTYPE)
        factors = {"layer": (torch.randn(D_OUT, 1, generator=gen, dtype=DTYPE), torch.randn(1, D, generator=gen, dtype=DTYPE))}
        erased.append((states, _concept(states, factors)))
    return w, retained, invariants, erased


def _constrained(w, retained, invariants, erased, alpha=1e-6, threshold=1e-3):
    accumulator = FusionAccumulator(D, {"layer": (D_OUT, D)})
    for _, concept in erased:
        accumulator.add(concept.statistics, concept.text_map, concept.factors)
    projector = null_space_projector(gram(retained[None]), threshold, invariants)
    text_side = constrained_text_side(accumulator.gram_sum, projector, alpha)
    return w + accumulator.residual("layer", w) @ text_side, projector


def test_the_constrained_edit_leaves_retained_states_and_invariants_unchanged():
    w, retained, invariants, erased = _setup()
    fused, projector = _constrained(w, retained, invariants, erased)
    scale = (w @ retained.T).abs().max()
    assert ((fused - w) @ retained.T).abs().max() / scale < 1e-6
    assert ((fused - w) @ invariants.T).abs().max() / scale < 1e-6
    # the edit is real: 16 - 6 retained - 2 invariant directions are left, and the concepts move
    assert null_space_dimension(projector) == D - 6 - 2
    assert ((fused - w) @ erased[0][0].T).abs().max() / scale > 1e-2


def test_the_constrained_edit_meets_targets_inside_the_null_space():
    """Concept states with no retained component get exactly their targets (alpha -> 0)."""
    w, retained, _, _ = _setup()
    projector = null_space_projector(gram(retained[None]), 1e-3)
    gen = torch.Generator().manual_seed(5)
    states = torch.randn(3, D, generator=gen, dtype=DTYPE) @ projector  # inside the null space
    factors = {"layer": (torch.randn(D_OUT, 1, generator=gen, dtype=DTYPE), torch.randn(1, D, generator=gen, dtype=DTYPE))}
    fused, _ = _constrained(w, retained, None, [(states, _concept(states, factors))], alpha=1e-9)
    up, down = factors["layer"]
    assert torch.allclose(fused @ states.T, (w + up @ down) @ states.T, atol=1e-6)


def test_a_threshold_that_leaves_no_null_space_is_a_clear_error(tiny):
    from erasure.methods.fusion import fused_weights
    from erasure.spec import FusionSettings, PreserveSpec

    gen = torch.Generator().manual_seed(0)
    dim = tiny.text_encoder.config.hidden_size
    full_prior = gram(torch.randn(1, 4 * dim, dim, generator=gen, dtype=DTYPE))  # every direction used
    concept = _concept(torch.randn(4, dim, generator=gen, dtype=DTYPE))
    with pytest.raises(RequestError, match="raise fusion.threshold"):
        fused_weights(tiny, [concept], full_prior, PreserveSpec(), FusionSettings(method="constrained", threshold=1e-6))


def _tiny_concept(tiny, seed: int, states: int):
    """The tiny model's K/V weights, one random concept with a rank-1 LoRA on each, a random prior."""
    from erasure.core.attention import cross_attention_projections

    gen = torch.Generator().manual_seed(seed)
    dim = tiny.text_encoder.config.hidden_size
    base = {n: p.weight.data.clone() for n, p in cross_attention_projections(tiny.unet).items()}
    factors = {n: (torch.randn(w.shape[0], 1, generator=gen), torch.randn(1, dim, generator=gen)) for n, w in base.items()}
    concept = _concept(torch.randn(states, dim, generator=gen, dtype=DTYPE), factors)
    return base, concept, gram(torch.randn(1, 8, dim, generator=gen, dtype=DTYPE))


def test_value_only_fusion_keeps_every_key_projection(tiny):
    from erasure.methods.fusion import fused_weights
    from erasure.spec import FusionSettings, PreserveSpec

    base, concept, prior = _tiny_concept(tiny, seed=1, states=4)
    for method in ("mace", "constrained"):
        weights = fused_weights(tiny, [concept], prior, PreserveSpec(), FusionSettings(method=method, projections="v"))
        assert all(torch.equal(weights[n], base[n]) for n in base if n.endswith("to_k")), method
        assert any(not torch.allclose(weights[n], base[n]) for n in base if n.endswith("to_v")), method


def test_adversarial_map_is_the_least_squares_embedding_of_the_original_outputs():
    """RECE: c_adv = A c minimises sum_l ||W*_l c' - W_l c||^2 + lam ||c'||^2: its gradient is zero."""
    gen = torch.Generator().manual_seed(2)
    base = {f"l{i}": torch.randn(D_OUT, D, generator=gen, dtype=DTYPE) for i in range(3)}
    fused = {n: w + 0.3 * torch.randn(D_OUT, D, generator=gen, dtype=DTYPE) for n, w in base.items()}
    c = torch.randn(D, 1, generator=gen, dtype=DTYPE)
    terms = adversarial_terms(base, fused, c @ c.T, ridge=1e-2)
    # with G = c c^T the adversarial Gram is (A c)(A c)^T: recover A c from its cross term
    c_adv = torch.linalg.lstsq(fused["l0"] @ c, terms.cross["l0"]).solution.T  # (D, 1)
    assert torch.allclose(terms.gram, c_adv @ c_adv.T, atol=1e-8)
    normal = sum(fused[n].T @ fused[n] for n in base)
    lam = 1e-2 * float(torch.trace(normal)) / D
    gradient = sum(fused[n].T @ (fused[n] @ c_adv - base[n] @ c) for n in base) + lam * c_adv
    assert gradient.abs().max() < 1e-8


def test_an_adversarial_round_leaves_less_of_the_concept_to_find():
    """After a RECE round, the best embedding for the concept's original outputs (over every
    layer at once, as RECE finds it) reproduces them worse, and retained states still do not move."""
    gen = torch.Generator().manual_seed(3)
    layers = [f"l{i}" for i in range(4)]  # 4 x 9 outputs > 16 inputs: an embedding cannot fake any output
    basis = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=DTYPE))[0]
    retained = torch.randn(40, 4, generator=gen, dtype=DTYPE) @ basis[:, :4].T
    base = {n: torch.randn(D_OUT, D, generator=gen, dtype=DTYPE) for n in layers}
    states = torch.randn(6, D, generator=gen, dtype=DTYPE)
    factors = {n: (torch.randn(D_OUT, 1, generator=gen, dtype=DTYPE), torch.randn(1, D, generator=gen, dtype=DTYPE)) for n in layers}
    concept = _concept(states, factors)
    accumulator = FusionAccumulator(D, {n: (D_OUT, D) for n in layers})
    accumulator.add(concept.statistics, concept.text_map, concept.factors)
    projector = null_space_projector(gram(retained[None]), 1e-3)

    def solve(extra=None):
        gram_sum = accumulator.gram_sum + (extra.gram if extra else 0)
        text_side = constrained_text_side(gram_sum, projector, 1e-4)
        out = {}
        for n, w in base.items():
            residual = accumulator.residual(n, w) + ((extra.cross[n] - w @ extra.gram) if extra else 0)
            out[n] = w + residual @ text_side
        return out

    def leak(fused):
        stacked, original = torch.cat([fused[n] for n in layers]), torch.cat([base[n] for n in layers]) @ states.T
        adv = torch.linalg.lstsq(stacked, original).solution
        return float((stacked @ adv - original).norm() / original.norm())

    first = solve()
    second = solve(adversarial_terms(base, first, accumulator.gram_sum, 1e-3))
    assert leak(second) > leak(first) * 1.05
    for n in layers:
        assert ((second[n] - base[n]) @ retained.T).abs().max() < 1e-6 * (base[n] @ retained.T).abs().max()


def test_separable_increments_are_zero_on_the_other_concepts_and_the_empty_prompt():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(D_OUT, D, generator=gen, dtype=DTYPE)
    invariants = torch.randn(2, D, generator=gen, dtype=DTYPE)
    concepts = []
    for _ in range(3):
        states = torch.randn(3, D, generator=gen, dtype=DTYPE)
        factors = {"layer": (torch.randn(D_OUT, 2, generator=gen, dtype=DTYPE), torch.randn(2, D, generator=gen, dtype=DTYPE))}
        concepts.append((states, _concept(states, factors)))
    projectors = separable_projectors([c for _, c in concepts], NO_PRIOR, invariants, 1e-6)
    scale = (w @ invariants.T).abs().max()
    for i, (_, concept) in enumerate(concepts):
        up, down = concept.factors["layer"]
        increment = up @ down @ projectors[i]
        assert (increment @ invariants.T).abs().max() / scale < 1e-6
        for j, (states, _) in enumerate(concepts):
            moved = (increment @ states.T).abs().max() / scale
            assert moved < 1e-6 if j != i else moved > 1e-2, (i, j)
    fused = separable_weights({"layer": w}, [c for _, c in concepts], NO_PRIOR, invariants, 1e-6)["layer"]
    expected = w + sum(c.factors["layer"][0] @ c.factors["layer"][1] @ p for (_, c), p in zip(concepts, projectors))
    assert torch.allclose(fused, expected, atol=1e-10)


def test_separable_capacity_running_out_is_an_error_not_silent_damage():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(D_OUT, D, generator=gen, dtype=DTYPE)
    concepts = []
    for _ in range(4):  # 4 x 8 states fill a 16-wide space: no room for anyone
        states = torch.randn(8, D, generator=gen, dtype=DTYPE)
        factors = {"layer": (torch.randn(D_OUT, 1, generator=gen, dtype=DTYPE), torch.randn(1, D, generator=gen, dtype=DTYPE))}
        concepts.append(_concept(states, factors))
    with pytest.raises(RequestError, match="capacity is exhausted"):
        separable_weights({"layer": w}, concepts, NO_PRIOR, torch.randn(1, D, generator=gen, dtype=DTYPE), 1e-6)


@pytest.mark.parametrize(
    ("which", "extra"),
    [("after", set()), ("last", {(5, 3)}), ("span", {(3, 3), (4, 3), (5, 3)})],
)
def test_edit_tokens_pair_the_concepts_own_tokens_with_the_anchors(which, extra):
    # [BOS a photo] [x y z] [EOS] pad...  vs  [BOS a photo] [w] [EOS] pad...
    concept = [0, 1, 2, 10, 11, 12, 9, 8, 8, 8]
    anchor = [0, 1, 2, 20, 9, 8, 8, 8, 8, 8]
    alignment = align_tokens(concept, 7, anchor, 5)
    assert alignment.concept_span == (3, 4, 5) and alignment.anchor_span == (3,)
    assert set(alignment.with_concept_tokens(which).pairs) - set(alignment.pairs) == extra


def test_an_anchor_that_is_the_concepts_head_word_pairs_with_the_concepts_words():
    # "a photo white car" vs "a photo car": the anchor has no span of its own; "white" pairs with "car"
    concept, anchor = [0, 1, 2, 30, 31, 9, 8, 8], [0, 1, 2, 31, 9, 8, 8, 8]
    alignment = align_tokens(concept, 6, anchor, 5)
    assert alignment.concept_span == (3,) and alignment.anchor_span == (3,)
    assert set(alignment.with_concept_tokens("span").pairs) - set(alignment.pairs) == {(3, 3)}


def test_adversarial_rounds_accumulate(tiny):
    """Round 2 erases round 1's adversarial states *and* its own: the terms add up."""
    from erasure.core.closed_form import FusionAccumulator
    from erasure.core.text import empty_prompt_states
    from erasure.methods.fusion import constrained_weights, fused_weights
    from erasure.spec import FusionSettings, PreserveSpec

    base, concept, prior = _tiny_concept(tiny, seed=7, states=6)
    dim = tiny.text_encoder.config.hidden_size
    settings = FusionSettings(method="constrained", adversarial_rounds=2, output_edit=None)  # RECE alone
    fused = fused_weights(tiny, [concept], prior, PreserveSpec(), settings)

    accumulator = FusionAccumulator(dim, {n: tuple(w.shape) for n, w in base.items()})
    accumulator.add(concept.statistics, concept.text_map, concept.factors)
    projector = null_space_projector(prior, settings.threshold, empty_prompt_states(tiny))
    first = constrained_weights(accumulator, base, projector, settings.alpha)
    found_1 = adversarial_terms(base, first, accumulator.gram_sum, settings.adversarial_ridge)
    second = constrained_weights(accumulator, base, projector, settings.alpha, found_1)
    found_2 = adversarial_terms(base, second, accumulator.gram_sum, settings.adversarial_ridge)
    both = constrained_weights(accumulator, base, projector, settings.alpha, found_1 + found_2)
    only_last = constrained_weights(accumulator, base, projector, settings.alpha, found_2)
    for name in base:
        torch.testing.assert_close(fused[name], both[name], rtol=0, atol=1e-6)
    assert max(float((only_last[n] - both[n]).abs().max()) for n in base) > 1e-4


def test_separable_fusion_refuses_settings_it_would_ignore():
    from erasure.spec import parse_request

    request = {"concepts": [{"name": "red", "anchor": "white"}], "method": {"objective": "separable"}}
    for fusion in ({"method": "separable", "projections": "v"}, {"method": "separable", "adversarial_rounds": 1}):
        with pytest.raises(RequestError, match="fusion.method separable fuses"):
            parse_request(request | {"fusion": fusion})
    with pytest.raises(RequestError, match="set both"):
        parse_request(request | {"fusion": {"method": "constrained"}})


def test_requests_likely_to_damage_retained_concepts_are_warned_about():
    from erasure.spec import parse_request

    many = [{"name": f"thing{i}", "anchor": "object"} for i in range(8)]
    keep = {"concepts": ["tree"]}
    warned = parse_request({"concepts": many, "preserve": keep | {"lam2": 1.0}, "fusion": {"method": "mace"}})
    assert any("preserve.lam2" in w for w in warned.specificity_warnings())
    assert not parse_request({"concepts": many, "preserve": keep | {"lam2": 64.0}, "fusion": {"method": "mace"}}).specificity_warnings()
    assert not parse_request({"concepts": many, "preserve": keep, "fusion": {"method": "constrained"}}).specificity_warnings()
    bare = parse_request({"concepts": many, "fusion": {"method": "constrained"}})
    assert any("preserve lists no concepts" in w for w in bare.specificity_warnings())


def test_the_output_side_edit_spares_retained_and_erased_states_and_reaches_an_unseen_one():
    """fusion.output_edit: a retained state (outside P's range) and an erased one (in the span the
    erased states cover) keep their outputs; a state they never saw, whose outputs lie in the erased
    states' output directions, loses them."""
    from erasure.methods.constrained import null_space_projector, output_side_edit

    torch.manual_seed(0)
    d, d_out = 12, 6
    retained = torch.randn(4, d, dtype=torch.float64)
    projector = null_space_projector(retained.T @ retained, 1e-3)
    free = torch.linalg.eigh(projector).eigenvectors[:, -8:]  # an orthonormal basis of P's 8 free directions
    erased = torch.randn(5, 3, dtype=torch.float64) @ free[:, :3].T  # the erased states span 3 of them
    weight = torch.randn(d_out, d, dtype=torch.float64)
    delta = output_side_edit({"v": weight}, erased.T @ erased / 5, projector, energy=0.99)["v"]
    assert (delta @ retained.T).abs().max() < 1e-9
    assert (delta @ erased.T).abs().max() < 1e-9
    # an unseen free direction that the weight sends where the erased states speak
    unseen = free[:, 3]
    heard = torch.linalg.svd(weight @ erased.T, full_matrices=False).U[:, :3]  # the erased states' 3 output directions
    steered = weight + torch.outer(heard[:, 0], unseen) * 5.0
    delta = output_side_edit({"v": steered}, erased.T @ erased / 5, projector, energy=0.99)["v"]
    before = heard.T @ (steered @ unseen)
    after = heard.T @ ((steered + delta) @ unseen)
    assert after.norm() < 1e-6 * before.norm()


def test_the_output_side_edit_keeps_the_strongly_spanned_part_of_erased_states_whatever_their_spectrum():
    """Review: erased states with a decaying spectrum are only partly in V; what V spans keeps its
    outputs exactly (the weak directions may move, which the docs say)."""
    from erasure.methods.constrained import SPANNED, null_space_projector, output_side_edit

    torch.manual_seed(1)
    d = 12
    retained = torch.randn(4, d, dtype=torch.float64)
    projector = null_space_projector(retained.T @ retained, 1e-3)
    free = torch.linalg.eigh(projector).eigenvectors[:, -8:]
    scales = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.01], dtype=torch.float64)
    erased = torch.randn(40, 5, dtype=torch.float64) * scales @ free[:, :5].T
    gram = erased.T @ erased / 40
    # the erased states' dominant directions from their own SVD: energies 1, 0.25, 0.04, ... of the
    # largest, so the first two are above SPANNED and the rest below (the case the first test missed)
    assert SPANNED < 0.25 and 0.04 < SPANNED
    strong = torch.linalg.svd(erased, full_matrices=False).Vh[:2].T
    weight = torch.randn(6, d, dtype=torch.float64)
    delta = output_side_edit({"v": weight}, gram, projector, energy=0.9)["v"]
    assert (delta @ strong).abs().max() < 1e-9
    assert (delta @ retained.T).abs().max() < 1e-9


def test_the_output_side_edit_removes_nothing_when_the_erased_states_have_no_free_part():
    """Review: erased states inside the retained span tell no output direction; the edit was -W P."""
    from erasure.methods.constrained import null_space_projector, output_side_edit

    torch.manual_seed(2)
    retained = torch.randn(4, 12, dtype=torch.float64)
    projector = null_space_projector(retained.T @ retained, 1e-3)
    erased = torch.randn(3, 4, dtype=torch.float64) @ retained  # inside the retained span
    delta = output_side_edit({"v": torch.randn(6, 12, dtype=torch.float64)}, erased.T @ erased, projector, 0.9)["v"]
    assert delta.abs().max() < 1e-9


def test_extra_terms_for_every_projection_meet_only_the_edited_ones_with_rece_rounds(tiny):
    """Review: closure's terms cover every projection; with projections: v and RECE rounds the sum
    of terms looked up a key projection and the re-solve crashed after a whole round of attacks."""
    from erasure.audit.closure import closure_terms
    from erasure.core.closed_form import PriorStatistics
    from erasure.erase import concept_text
    from erasure.methods.fusion import base_weights, fusion_solver
    from erasure.spec import FusionSettings, PreserveSpec

    statistics = concept_text(tiny, ConceptSpec(name="cat", anchor="house"), 4, seed=0).statistics
    fusable = SimpleNamespace(statistics=statistics, text_map=torch.eye(32, dtype=torch.float64), factors={})
    prior = PriorStatistics(torch.eye(32, dtype=torch.float64), 1)
    fusion = FusionSettings(method="mace", projections="v", adversarial_rounds=1)
    solve = fusion_solver(tiny, [fusable], prior, PreserveSpec(), fusion)
    terms = closure_terms(tiny, [("zebra a photo of the cat", "zebra a photo of the house")], base_weights(tiny))
    weights = solve(terms)
    base = base_weights(tiny)
    assert all(torch.equal(weights[n], base[n]) for n in base if n.endswith("to_k"))
    assert any(not torch.equal(weights[n], base[n]) for n in base if n.endswith("to_v"))


def test_oce_style_rotation_recovers_a_rotation_of_the_outputs_and_only_rotates_v():
    from erasure.core.attention import cross_attention_projections
    from erasure.diffusion.models import build_tiny_components
    from erasure.methods.rotation import procrustes_rotation, rotated_value_weights

    torch.manual_seed(0)
    weight = torch.randn(D_OUT, D, dtype=DTYPE)
    true_rotation, _ = torch.linalg.qr(torch.randn(D_OUT, D_OUT, dtype=DTYPE))
    states = torch.randn(64, D, dtype=DTYPE)
    # targets whose value vectors are the states' rotated: W y = R W x, with y = pinv(W) R W x
    targets = states @ (torch.linalg.pinv(weight) @ true_rotation @ weight).T
    cross = targets.T @ states / len(states)  # E[y x^T]
    assert torch.allclose(procrustes_rotation(weight, cross), true_rotation, atol=1e-8)

    tiny = build_tiny_components()
    width = tiny.text_encoder.config.hidden_size
    statistics = _concept(torch.randn(32, width, dtype=DTYPE)).statistics
    statistics.aligned_cross = torch.randn(width, width, dtype=DTYPE)
    base = cross_attention_projections(tiny.unet)
    free = rotated_value_weights(tiny, [statistics], torch.eye(width, dtype=DTYPE), preserve_weight=0.0)
    held = rotated_value_weights(tiny, [statistics], torch.eye(width, dtype=DTYPE), preserve_weight=1e6)
    assert free and all(name.endswith("to_v") for name in free)
    for name, weight in free.items():
        original = base[name].weight.data.double()
        expected = procrustes_rotation(original, statistics.aligned_cross) @ original
        assert torch.allclose(weight.double(), expected, atol=1e-5)
        assert (weight.double() - original).norm() > 0.1 * original.norm()  # it did rotate
        assert torch.allclose(weight.double().norm(dim=0), original.norm(dim=0), atol=1e-4)  # norms kept
        # an overwhelming prior holds every retained value vector still
        assert (held[name].double() - original).norm() < 1e-2 * (weight.double() - original).norm()
