"""Alias discovery (erasure.methods.discovery): found from the model and its judge alone."""

import pytest
import torch

from erasure.spec import ConceptSpec, DiscoverySettings

SMALL = DiscoverySettings(vocabulary=300, screened=60, confirmed=8, controls=8, samples=8)


@pytest.fixture(scope="module")
def toyworld():
    from erasure.loading import load_components

    return load_components("builtin:toyworld")


@pytest.fixture(scope="module")
def judge():
    from erasure.worlds.builtins import concept_judge

    return concept_judge("builtin:toyworld", "method.discovery")


def planted(components, word: str, concept: str):
    """A copy of ``components`` whose cross-attention reads ``word`` as ``concept``: CFR maps the
    word's states, in every template, to the concept's (an alias planted in the base model)."""
    from erasure.core.attention import cross_attention_projections
    from erasure.core.closed_form import apply_text_map, refinement_map
    from erasure.diffusion.models import with_weights
    from erasure.erase import concept_text, prior_statistics

    spec = ConceptSpec(name=word, anchor=concept)
    text = concept_text(components, spec, 30, seed=0, edit_tokens="span")
    prior = prior_statistics(components, [""]).with_anchors([text.statistics]).gram()
    text_map = refinement_map([text.statistics], prior, lam1=0.1, ridge=1e-3)
    weights = {n: apply_text_map(p.weight.data, text_map) for n, p in cross_attention_projections(components.unet).items()}
    return with_weights(components, weights)


def discover(components, judge, name, anchor="square", settings=SMALL):
    from erasure.methods.discovery import discover_aliases
    from erasure.methods.mining import never_mined

    concept = ConceptSpec(name=name, anchor=anchor)
    return discover_aliases(components, concept, settings, judge, 25, 1.5, seed=0, exclude=never_mined(concept, ()))


class Refuses(dict):
    """A table that fails any read: what discovery must never look at."""

    def _refuse(self, *args, **kwargs):
        raise AssertionError("alias discovery read the world's synonym tables or the evaluation's probes")

    __getitem__ = get = items = keys = values = __iter__ = __contains__ = __len__ = _refuse


def test_a_planted_alias_is_found_from_the_model_and_judge_alone(toyworld, judge, monkeypatch):
    import erasure.worlds.builtins as builtins
    import erasure.worlds.toyworld.accuracy as accuracy
    import erasure.worlds.toyworld.judge as toy_judge
    import erasure.worlds.toyworld.model as toy_model
    import erasure.worlds.toyworld.world as world
    from erasure.methods.discovery import candidate_vocabulary

    assert "music" in candidate_vocabulary(SMALL.vocabulary)
    model = planted(toyworld, "music", "heart")
    tables = ((world, "SYNONYMS"), (world, "HELD_OUT"), (toy_judge, "SYNONYMS"), (accuracy, "SYNONYMS"), (accuracy, "HELD_OUT"))
    for module, table in tables:
        monkeypatch.setattr(module, table, Refuses())
    for module, function in (
        (toy_judge, "erasure_probes"), (toy_judge, "audit_probes"), (toy_model, "drawable_unseen_words"),
        (builtins, "erasure_probes"), (builtins, "audit_probes"), (builtins, "drawable_unseen_words"),
    ):  # the evaluation's and the audit's probes, wherever they are imported from
        monkeypatch.setattr(module, function, Refuses()._refuse)

    found = discover(model, judge, "heart")
    assert "music" in found.phrases
    alias = next(a for a in found.aliases if a.phrase == "music")
    assert alias.hits >= 6 and alias.p_value < SMALL.p_value and alias.base_rate < 0.5
    # the unplanted model does not draw a heart for "music": not an alias there
    assert "music" not in discover(toyworld, judge, "heart").phrases


class SeesItEverywhere:
    """A judge for which every image shows the concept: the case of a concept that is the model's
    default, what words it does not know fall back to."""

    def shows(self, images, concept):
        return [True] * len(images)


def test_a_word_drawn_as_the_concept_only_at_the_base_rate_is_not_an_alias(toyworld):
    """A word the model does not know still draws *something*, often the same thing. Where the
    concept is that default, every candidate passes ``min_rate`` alone; the base rate (the controls
    drew it too) must reject them all."""
    found = discover(toyworld, SeesItEverywhere(), "circle")
    assert found.checked and all(c["hits"] == SMALL.samples for c in found.checked)
    assert found.base_rates[0] > 0.9
    assert not found.aliases


def test_the_decision_compares_a_candidate_with_the_base_rate():
    from erasure.methods.discovery import is_alias

    assert is_alias(8, 8, 0.1, SMALL) and is_alias(6, 8, 0.1, SMALL)
    assert not is_alias(5, 8, 0.1, SMALL)  # below min_rate, however rare the concept
    assert not is_alias(8, 8, 0.5, SMALL)  # 8 of 8 happens one time in 256 at a 50 % base rate


def test_an_excluded_alias_is_never_taken(toyworld, judge):
    model = planted(toyworld, "music", "heart")
    concept = ConceptSpec(name="heart", anchor="square", exclude_aliases=["music"])
    from erasure.methods.discovery import discover_aliases

    found = discover_aliases(model, concept, SMALL, judge, 25, 1.5, seed=0)
    assert "music" not in found.phrases and "music" not in [c["phrase"] for c in found.checked]


def test_aliases_of_a_compound_concept_combine_across_its_words():
    from erasure.methods.discovery import Alias, Discovery, alias_phrases

    concept = ConceptSpec(name="blue star", anchor="white star", exclude_aliases=["azure asterisk"])
    discovery = Discovery(aliases=[
        Alias("azure star", 0, "azure", 0.9, 8, 8, 0.1, 1e-8), Alias("blue asterisk", 1, "asterisk", 0.9, 8, 8, 0.1, 1e-8),
    ])
    assert alias_phrases(concept, discovery, 16) == ["azure star", "blue asterisk"]
    assert alias_phrases(ConceptSpec(name="blue star", anchor="white star"), discovery, 16) == [
        "azure star", "blue asterisk", "azure asterisk",
    ]


def test_discovery_on_a_model_without_a_judge_is_refused_before_any_work(tiny):
    from erasure.erase import prepare_request
    from erasure.spec import RequestError, parse_request

    request = parse_request({
        "model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}], "method": {"discovery": {}},
        "fusion": {"method": "mace"},
    })
    with pytest.raises(RequestError, match="method.discovery: 'builtin:tiny' has no judge"):
        prepare_request(request, tiny)


def test_a_concept_the_toy_judge_cannot_see_is_refused_by_name(toyworld):
    from erasure.erase import prepare_request
    from erasure.spec import RequestError, parse_request

    request = parse_request({
        "concepts": [{"name": "red", "anchor": "white"}, {"name": "crimson", "anchor": "white"}], "method": {"discovery": {}},
    })
    with pytest.raises(RequestError, match=r"concepts\.1\.name: method.discovery: 'crimson': the toy judge knows"):
        prepare_request(request, toyworld)


def test_the_binomial_tail_is_exact():
    from erasure.methods.discovery import binomial_tail

    assert binomial_tail(0, 8, 0.3) == pytest.approx(1.0)
    assert binomial_tail(8, 8, 0.5) == pytest.approx(0.5**8)
    assert binomial_tail(7, 8, 0.5) == pytest.approx(9 / 256)
    assert binomial_tail(6, 8, 0.1) == pytest.approx(28 * 0.1**6 * 0.9**2 + 8 * 0.1**7 * 0.9 + 0.1**8)


def test_anchor_fidelity_counts_the_erased_images_the_judge_sees_as_the_anchor():
    from erasure.evaluation.evaluate import anchor_fidelity
    from erasure.probes import Probe
    from erasure.worlds.toyworld.judge import ToyJudge

    class Classifier:  # what the toy classifier would say of four images
        def predict(self, images):
            return {"colour": ["white", "white", "purple", "white"], "shape": ["star", "square", "star", "star"],
                    "style": ["solid"] * 4}

    probes = [
        Probe("erased", "blue star", "a blue star", {"colour": "blue", "shape": "star"}),
        Probe("synonym", "blue star", "an azure star", {"colour": "blue", "shape": "star"}),
        Probe("erased", "blue star", "a blue star", {"colour": "blue", "shape": "star"}),
        Probe("retained", "yellow star", "a yellow star", {"colour": "yellow", "shape": "star"}),
    ]
    verdicts = ToyJudge(Classifier()).anchor_verdicts(torch.zeros(4, 3, 16, 16), probes, {"blue star": "white star"})
    assert verdicts[:3] == [True, False, False] and verdicts[3] is None  # a retained concept has no anchor
    assert anchor_fidelity(probes, verdicts) == pytest.approx(1 / 3)
    # an anchor outside the judge's classes is not measured, rather than counted as a miss
    unseen = ToyJudge(Classifier()).anchor_verdicts(torch.zeros(4, 3, 16, 16), probes, {"blue star": "the ground"})
    assert unseen == [None] * 4 and anchor_fidelity(probes, unseen) != anchor_fidelity(probes, unseen)  # NaN


def test_a_concepts_artifact_records_its_discovery_and_the_phrases_erased(toyworld, tmp_path, monkeypatch):
    """Review: concept.json said discovery had not run (the text statistics dropped it), and listed
    every alias found as erased where only ``max_phrases`` are."""
    from erasure.artifacts import save_concept, summary_aliases
    from erasure.erase import concept_text
    from erasure.methods.discovery import Alias, Discovery

    concept = ConceptSpec(name="blue star", anchor="white star")
    found = Discovery(aliases=[
        Alias("azure star", 0, "azure", 0.9, 8, 8, 0.1, 1e-8), Alias("blue asterisk", 1, "asterisk", 0.9, 8, 8, 0.1, 1e-8),
    ])
    text = concept_text(toyworld, concept, 6, seed=0, edit_tokens="span", discovery=found, max_aliases=2)
    assert text.discovery is found and text.erased_aliases == ["azure star", "blue asterisk"]  # "azure asterisk" cut
    assert any("azure" in prompt for prompt in text.prompts)

    class Result:  # what save_concept reads of a ConceptResult
        def __init__(self):
            from erasure.diffusion.data import ConceptData

            self.concept, self.text, self.text_map = concept, text, torch.eye(4)
            self.data = ConceptData("a photo of the blue star", torch.zeros(0, 3, 16, 16), torch.zeros(0, 16, 16))
            self.lora_state, self.losses, self.seconds = {}, [], {}
            self.statistics = text.statistics

    monkeypatch.setattr("erasure.artifacts.save_lora", lambda state, folder: folder.mkdir(parents=True, exist_ok=True))
    summary = save_concept(Result(), tmp_path / "concept")
    assert summary_aliases(summary) == ["azure star", "blue asterisk"]
    assert [a["phrase"] for a in summary["discovery"]["aliases"]] == ["azure star", "blue asterisk"]
