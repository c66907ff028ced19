"""Adversarial closure (erasure.audit.closure): attacks on a training split, found prompts erased."""

from types import SimpleNamespace

import pytest
import torch

from erasure.spec import ClosureSettings, ConceptSpec, parse_request

SMALL = ClosureSettings(attacks=["prefix"], rounds=2, prompts=1, top_k=2, images=2, draws=2, vocabulary=200)


@pytest.fixture(scope="module")
def toyworld():
    from erasure.loading import load_components

    return load_components("builtin:toyworld")


def test_the_training_split_shares_no_template_and_no_seed_with_any_audit():
    from erasure.audit.closure import ClosureConcept, training_prompts, training_seeds
    from erasure.audit.run import AUDIT_TEMPLATES_BY_KIND
    from erasure.core.prompts import TEMPLATES
    from erasure.probes import SEEDS
    from erasure.worlds.builtins import BUILTINS
    from erasure.worlds.toyworld.judge import audit_probes

    audit_templates = {t for b in BUILTINS.values() for t in b.audit_templates} | {t for ts in AUDIT_TEMPLATES_BY_KIND.values() for t in ts}
    for kind in TEMPLATES:
        item = ClosureConcept(ConceptSpec(name="red", kind=kind, anchor="white", synonyms=["crimson"]), torch.zeros(1, 3, 8, 8), ("scarlet",), seed=3)
        prompts = training_prompts(item, 64)
        assert {p.template for p in prompts} <= set(TEMPLATES[kind])
        assert not {p.template for p in prompts} & audit_templates
        assert {p.phrase for p in prompts} == {"red", "crimson", "scarlet"}
        seeds = training_seeds(item, 16)
        assert len(set(seeds)) == 16 and all(SEEDS <= s < 2 * SEEDS for s in seeds)
    # every seed an audit draws (probes here; attack seeds come from the same range) is below SEEDS
    probes = audit_probes(["red", "circle"], ["green"], 16, 4, seed=11)
    assert probes and all(0 <= p.seed < SEEDS for p in probes)


def test_closure_terms_send_a_found_prompt_where_the_base_model_sends_its_anchor(tiny):
    """Solving with a found prompt's terms moves that prompt's keys and values to the anchor
    prompt's (as the base model gives them), and leaves the solve without them unchanged."""
    from erasure.audit.closure import closure_terms
    from erasure.core.attention import cross_attention_projections
    from erasure.core.closed_form import PriorStatistics
    from erasure.core.text import encode_prompts
    from erasure.methods.fusion import fusion_solver
    from erasure.spec import FusionSettings, PreserveSpec

    base = {n: p.weight.data.clone() for n, p in cross_attention_projections(tiny.unet).items()}
    prior = PriorStatistics(torch.eye(32, dtype=torch.float64) * 1e-3, 1)
    solve = fusion_solver(tiny, [], prior, PreserveSpec(lam2=1.0), FusionSettings(method="mace"))
    found, anchor = "zebra a photo of the cat", "zebra a photo of the dog"
    with_terms = solve(closure_terms(tiny, [(found, anchor)], base))
    without = solve(None)
    states, anchor_states = encode_prompts(tiny, [found])[0], encode_prompts(tiny, [anchor])[0]
    name = next(iter(base))
    target = anchor_states.double() @ base[name].double().T
    gap = lambda w: float((states.double() @ w.double().T - target).norm())  # noqa: E731
    assert torch.equal(without[name], base[name])  # no concepts, no terms: nothing moves
    assert gap(with_terms[name]) < 0.25 * gap(base[name])  # 0.11 of it, measured: the prior and ridge hold it back


@pytest.mark.slow
def test_rounds_lower_attack_success_on_the_training_split_and_never_touch_the_audit(toyworld, monkeypatch):
    """MACE's reference edit of "blue star" leaks to prefixes (as bench/attacks.py measures); closure's
    rounds bring their success on the training split down, drawing at training seeds only."""
    import erasure.audit.closure as closure_module
    from erasure.erase import run_stages
    from erasure.probes import SEEDS

    drawn: list[tuple[str, int]] = []
    real_sample = closure_module.sample

    def spy(components, prompts, seeds, *args, **kwargs):
        drawn.extend(zip(prompts, seeds))
        return real_sample(components, prompts, seeds, *args, **kwargs)

    monkeypatch.setattr(closure_module, "sample", spy)
    request = parse_request({
        "concepts": [{"name": "blue star", "anchor": "white star"}],
        "preserve": {"concepts": ["green", "white star", "blue heart"]},
        "method": {"images_per_concept": 4, "lora_steps": 10, "edit_tokens": "after"},
        "fusion": {"method": "mace", "closure": SMALL.model_dump()},
    })
    stages = run_stages(toyworld, request)
    rounds = stages.closure.rounds
    assert rounds[0].worst > SMALL.max_success, "the reference edit should leak on the training split"
    assert len(rounds) >= 2 and rounds[-1].worst < rounds[0].worst
    assert stages.closure.pairs["blue star"], "the prompts found were erased"
    assert drawn and all(SEEDS <= seed < 2 * SEEDS for _, seed in drawn)


class ScriptedJudge:
    """Sees the concept in every image while ``sees`` says so: what a round's success is made of."""

    def __init__(self, sees: bool):
        self.sees, self.calls = sees, 0

    def check(self, concept) -> None:
        pass

    def shows(self, images, concept) -> list[bool]:
        self.calls += 1
        return [self.sees] * len(images)


def _closure_run(tiny, judge, settings):
    from erasure.audit.closure import ClosureConcept, adversarial_closure
    from erasure.core.closed_form import PriorStatistics
    from erasure.erase import concept_text
    from erasure.methods.fusion import fusion_solver
    from erasure.spec import FusionSettings, PreserveSpec

    concept = ConceptSpec(name="cat", anchor="house")
    statistics = concept_text(tiny, concept, 4, seed=0).statistics

    fusable = SimpleNamespace(statistics=statistics, text_map=torch.eye(32, dtype=torch.float64), factors={})  # no LoRA
    prior = PriorStatistics(torch.eye(32, dtype=torch.float64), 1)
    inner = fusion_solver(tiny, [fusable], prior, PreserveSpec(), FusionSettings(method="mace"))
    solved = []

    def solve(extra):
        solved.append(extra)
        return inner(extra)

    item = ClosureConcept(concept, torch.rand(2, 3, 8, 8), seed=5)
    weights, closure = adversarial_closure(tiny, [item], solve, judge, settings, steps=2, guidance_scale=1.5)
    return weights, closure, solved, inner


def test_a_closure_that_finds_nothing_measures_once_and_solves_once(tiny):
    settings = ClosureSettings(attacks=("prefix", "ring-a-bell", "substitution"), rounds=3, prompts=1, top_k=2, images=1, draws=1, vocabulary=200)
    weights, closure, solved, inner = _closure_run(tiny, ScriptedJudge(False), settings)
    assert solved == [None] and len(closure.rounds) == 1 and closure.closed
    assert closure.rounds[0].success == {"cat": {"prefix": 0.0, "ring-a-bell": 0.0, "substitution": 0.0}}
    assert closure.pairs == {"cat": []}
    assert all(torch.equal(weights[n], w) for n, w in inner(None).items())


def test_a_closure_that_keeps_finding_adds_each_pair_once_and_stops_at_its_rounds(tiny):
    settings = ClosureSettings(rounds=2, prompts=1, top_k=2, images=1, draws=1, vocabulary=200)
    weights, closure, solved, inner = _closure_run(tiny, ScriptedJudge(True), settings)
    pairs = closure.pairs["cat"]
    assert not closure.closed and closure.rounds[-1].worst == 1.0
    assert len(pairs) == len(set(pairs)) > 0
    # a solve per round that found something new; the last round only measures what it returns
    assert solved[0] is None and all(extra is not None for extra in solved[1:])
    assert len(solved) == len(closure.rounds) <= settings.rounds + 1
    found = [p for r in closure.rounds[:-1] for p in r.found["cat"]]
    assert found == [p for p, _ in pairs]
    assert all(torch.equal(weights[n], w) for n, w in inner(solved[-1]).items())
    assert all(not p.startswith("cat ") for p in found)  # no attack uses the concept's own words
