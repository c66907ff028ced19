"""The mathematics of CFR and fusion, checked against their definitions."""

import pytest
import torch

from erasure.core.closed_form import (
    DTYPE,
    ConceptStatistics,
    FusionAccumulator,
    PriorStatistics,
    apply_text_map,
    gram,
    refinement_map,
    ridge_value,
)

D, D_OUT = 12, 7


def random_concept(generator, pairs=5, states=20):
    f = torch.randn(pairs, D, generator=generator, dtype=DTYPE)
    g = torch.randn(pairs, D, generator=generator, dtype=DTYPE)
    e = torch.randn(1, states, D, generator=generator, dtype=DTYPE)
    anchors = torch.randn(1, 10, D, generator=generator, dtype=DTYPE)
    stats = ConceptStatistics(
        aligned_gram=f.T @ f / pairs, aligned_cross=g.T @ f / pairs, gram=gram(e), anchor_gram=gram(anchors), anchor_count=10
    )
    return stats, f, g, e[0]


def random_lora(generator, rank=1):
    return {"layer": (torch.randn(D_OUT, rank, generator=generator), torch.randn(rank, D, generator=generator))}


def test_cfr_solution_satisfies_its_normal_equations():
    gen = torch.Generator().manual_seed(0)
    concepts = [random_concept(gen)[0] for _ in range(3)]
    prior = gram(torch.randn(1, 40, D, generator=gen, dtype=DTYPE))
    lam1, ridge = 0.7, 1e-2
    w = torch.randn(D_OUT, D, generator=gen, dtype=DTYPE)
    refined = w @ refinement_map(concepts, prior, lam1, ridge)
    a = sum(c.aligned_gram for c in concepts) + lam1 * prior
    b = sum(c.aligned_cross for c in concepts) + lam1 * prior
    r = ridge_value(a, ridge)
    eye = torch.eye(D, dtype=DTYPE)
    # d/dW' of the objective = 0  <=>  W' (A + rI) = W (B + rI)
    residual = refined @ (a + r * eye) - w @ (b + r * eye)
    assert residual.abs().max() < 1e-10


def test_cfr_without_prior_maps_aligned_states_to_the_anchor():
    gen = torch.Generator().manual_seed(1)
    stats, f, g, _ = random_concept(gen, pairs=5)  # 5 states < d = 12: exactly solvable
    w = torch.randn(D_OUT, D, generator=gen, dtype=DTYPE)
    text_map = refinement_map([stats], torch.zeros(D, D, dtype=DTYPE), lam1=0.0, ridge=1e-10)
    refined = apply_text_map(w, text_map)
    assert torch.allclose(refined @ f.T, w @ g.T, atol=1e-6)


def test_large_prior_weight_keeps_preserved_states_still():
    gen = torch.Generator().manual_seed(2)
    stats, _, _, _ = random_concept(gen, pairs=30)
    kept = torch.randn(6, D, generator=gen, dtype=DTYPE)
    prior = kept.T @ kept / len(kept)
    w = torch.randn(D_OUT, D, generator=gen, dtype=DTYPE)
    moves = []
    for lam1 in (0.0, 1.0, 1e4):
        refined = w @ refinement_map([stats], prior, lam1, ridge=1e-6)
        moves.append(float(((refined - w) @ kept.T).norm() / (w @ kept.T).norm()))
    assert moves[0] > 0.1  # without a prior, the preserved states do move
    assert moves[2] < 1e-3  # with lam1 = 1e4 they stay within 0.1 %
    assert moves[0] > moves[1] > moves[2]


def stacked_fusion(w, concepts, prior_states, lam2, ridge):
    """The fusion objective solved directly by least squares on stacked, weighted rows."""
    rows, targets = [], []
    for _stats, states, text_map, lora in concepts:
        up, down = lora["layer"]
        target = (w @ text_map + up.to(DTYPE) @ down.to(DTYPE)) @ states.T
        weight = 1.0 / len(states)  # Grams are means
        rows.append(states * weight**0.5)
        targets.append(target.T * weight**0.5)
    weight = lam2 / len(prior_states)
    rows.append(prior_states * weight**0.5)
    targets.append((w @ prior_states.T).T * weight**0.5)
    denominator = sum(s.T @ s / len(s) for _, s, _, _ in concepts) + lam2 * prior_states.T @ prior_states / len(prior_states)
    r = ridge_value(denominator, ridge)
    rows.append(torch.eye(D, dtype=DTYPE) * r**0.5)
    targets.append(w.T * r**0.5)
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution
    return solution.T


def make_fusion_case(seed, count=3):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D_OUT, D, generator=gen, dtype=DTYPE)
    concepts = []
    for _ in range(count):
        stats, _, _, states = random_concept(gen, states=25)
        text_map = torch.eye(D, dtype=DTYPE) + 0.1 * torch.randn(D, D, generator=gen, dtype=DTYPE)
        concepts.append((stats, states, text_map, random_lora(gen)))
    prior_states = torch.randn(50, D, generator=gen, dtype=DTYPE)
    return w, concepts, prior_states


def fuse(w, concepts, prior_states, lam2, ridge):
    acc = FusionAccumulator(D, {"layer": (D_OUT, D)})
    for stats, _, text_map, lora in concepts:
        acc.add(stats, text_map, lora)
    return acc.fuse({"layer": w}, gram(prior_states[None]), lam2, ridge)["layer"], acc


def test_fusion_from_summed_statistics_equals_stacked_raw_states():
    w, concepts, prior_states = make_fusion_case(3)
    fused, _ = fuse(w, concepts, prior_states, lam2=0.5, ridge=1e-3)
    direct = stacked_fusion(w, concepts, prior_states, lam2=0.5, ridge=1e-3)
    assert (fused - direct).abs().max() < 1e-6


def test_fusion_of_one_concept_without_prior_reproduces_its_model():
    w, concepts, _ = make_fusion_case(4, count=1)
    stats, states, text_map, lora = concepts[0]
    states = states[:8]  # fewer states than d: the concept's model is exactly reachable
    stats = ConceptStatistics(stats.aligned_gram, stats.aligned_cross, gram(states[None]), stats.anchor_gram, 10)
    acc = FusionAccumulator(D, {"layer": (D_OUT, D)})
    acc.add(stats, text_map, lora)
    fused = acc.fuse({"layer": w}, torch.zeros(D, D, dtype=DTYPE), lam2=0.0, ridge=1e-10)["layer"]
    up, down = lora["layer"]
    expected = (w @ text_map + up.to(DTYPE) @ down.to(DTYPE)) @ states.T
    assert torch.allclose(fused @ states.T, expected, atol=1e-5)


def test_removing_a_concept_equals_fusing_without_it():
    w, concepts, prior_states = make_fusion_case(5, count=4)
    with_all, acc = fuse(w, concepts, prior_states, 1.0, 1e-3)
    stats, _, text_map, lora = concepts[2]
    acc.remove(stats, text_map, lora)
    after_remove = acc.fuse({"layer": w}, gram(prior_states[None]), 1.0, 1e-3)["layer"]
    without, _ = fuse(w, concepts[:2] + concepts[3:], prior_states, 1.0, 1e-3)
    assert (after_remove - without).abs().max() < 1e-9
    assert (with_all - without).abs().max() > 1e-3  # the concept did matter


def test_fusion_memory_does_not_grow_with_concepts():
    w, concepts, prior_states = make_fusion_case(6, count=6)
    _, acc = fuse(w, concepts, prior_states, 1.0, 1e-3)
    tensors = [acc.gram_sum, acc.mapped_gram_sum, *acc.lora_terms.values()]
    assert sum(t.numel() for t in tensors) == 2 * D * D + D_OUT * D
    assert acc.concepts == 6


def test_prior_statistics_add_up_exactly():
    gen = torch.Generator().manual_seed(7)
    base_states = torch.randn(3, 5, D, generator=gen, dtype=DTYPE)
    prior = PriorStatistics.empty(D)
    prior.add(base_states[:2])
    prior.add(base_states[2:])
    assert torch.allclose(prior.gram(), gram(base_states))
    concepts = [random_concept(gen)[0] for _ in range(2)]
    combined = prior.with_anchors(concepts)
    assert combined.count == 15 + 20
    expected = (gram(base_states) * 15 + concepts[0].anchor_gram * 10 + concepts[1].anchor_gram * 10) / 35
    assert torch.allclose(combined.gram(), expected)
    assert prior.count == 15  # with_anchors leaves the base prior as it was


def test_capacity_is_zero_inside_the_retained_span_and_one_orthogonal_to_it():
    from erasure.core.capacity import capacity

    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))[0]
    retained = torch.randn(40, 4, generator=generator, dtype=torch.float64) @ basis[:, :4].T  # a 4-dim subspace
    inside = torch.randn(5, 4, generator=generator, dtype=torch.float64) @ basis[:, :4].T
    outside = torch.randn(5, 4, generator=generator, dtype=torch.float64) @ basis[:, 8:12].T
    assert capacity(inside, retained).rho < 1e-6 and capacity(inside, retained).rank == 4
    assert abs(capacity(outside, retained).rho - 1) < 1e-6
    half = inside + outside * (inside.norm(dim=1, keepdim=True) / outside.norm(dim=1, keepdim=True))
    assert abs(capacity(half, retained).rho - 2**-0.5) < 1e-6



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_text_maps_and_fusion_follow_the_weights_device():
    """Statistics live on the CPU, weights on the worker's GPU."""
    weight = torch.randn(D_OUT, D, device="cuda")
    refined = apply_text_map(weight, torch.eye(D, dtype=DTYPE))
    assert refined.device.type == "cuda" and torch.allclose(refined, weight)
