"""The identity world: its names, renders, judge and committed model (fast checks)."""

import numpy as np
import pytest
import torch

from erasure.worlds.identities import judge
from erasure.worlds.identities.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    CLASSES,
    FRAMES,
    GENERIC_WORDS,
    by_word,
    identities,
    identity_of,
    render_signature,
    sample_batch,
)


def test_at_least_1200_identities_each_a_distinct_signature_and_name():
    every = identities()
    assert len(every) >= 1200
    names = [i.name for i in every]
    aliases = [i.alias for i in every if i.alias]
    assert len(set(names)) == len(names) and len(set(aliases)) == len(aliases)
    assert not set(names) & set(aliases), "an alias must not be another identity's name"
    codes = {tuple(i.signature[k] for k in ATTRIBUTES) for i in every}
    assert len(codes) == len(every)
    for identity in every:
        for attribute, value in identity.signature.items():
            assert value in CLASSES[attribute]
        assert identity.signature["colour"] != "grey"  # the generic figure's colour is no identity's
    held_out = [i for i in every if i.alias and i.alias_held_out]
    listed = [i for i in every if i.alias and not i.alias_held_out]
    assert len(held_out) >= 100 and len(listed) >= 100


def test_every_name_and_alias_is_one_whole_minilm_token():
    from erasure.diffusion.models import packaged_encoder
    from erasure.worlds.toyworld.model import MINILM_PACKAGE

    _, tokenizer = packaged_encoder(MINILM_PACKAGE, "BertModel", 20)
    for word in by_word():
        assert tokenizer.tokenize(word) == [word], word
        assert word not in GENERIC_WORDS


def test_renders_show_background_and_frame_and_are_deterministic():
    rng = np.random.default_rng(0)
    framed = {"shape": "circle", "colour": "red", "style": "solid", "background": "navy", "frame": "gold"}
    image = render_signature(framed, np.random.default_rng(3))
    assert tuple(image[0, 0]) == FRAMES["gold"]
    plain = render_signature(framed | {"frame": "none"}, np.random.default_rng(3))
    assert tuple(plain[0, 0]) == BACKGROUNDS["navy"]
    assert np.array_equal(plain[1:-1, 1:-1], image[1:-1, 1:-1])
    a = sample_batch(np.random.default_rng(9), 8)
    b = sample_batch(np.random.default_rng(9), 8)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert any("grey" == s["colour"] for s in sample_batch(rng, 200)[2])  # generic captions draw the grey figure


def test_an_unknown_name_says_what_the_world_holds():
    with pytest.raises(ValueError, match="not an identity of the identity world"):
        identity_of("zzzqx")
    first = identities()[0]
    assert identity_of(first.name.upper()) == first


def test_the_committed_classifier_reads_clean_renders():
    from erasure.worlds.identities.classifier import identity_classifier_accuracy, load_identity_classifier

    accuracy = identity_classifier_accuracy(load_identity_classifier(), count=300)
    assert accuracy["all"] >= 0.99, accuracy


def test_probes_split_listed_and_held_out_aliases():
    every = identities()
    with_alias = [i for i in every if i.alias][:4]
    erased = [i.name for i in with_alias]
    listed = {with_alias[0].alias}
    probes = judge.erasure_probes(erased, [], per_concept=4, retained_limit=5, seed=0, listed_aliases=listed)
    groups = {p.group for p in probes}
    assert groups == {"erased", "retained", "synonym", "unseen"}
    assert all(with_alias[0].alias in p.prompt.split() for p in probes if p.group == "synonym")
    assert all(i.alias in p.prompt.split() for i in with_alias[1:] for p in probes if p.group == "unseen" and p.concept == i.name)
    assert all(p.concept not in erased for p in probes if p.group == "retained")
    assert len({p.concept for p in probes if p.group == "retained"}) == 5
    assert len({p.seed for p in probes}) == len(probes)
    audit = judge.audit_probes(erased, [], 4, 5, seed=1, listed_aliases=listed)
    templates = {t.replace("{}", "") for t in judge.IDENTITY_AUDIT_TEMPLATES}
    assert all(any(t.strip() in p.prompt for t in templates) for p in audit)


def test_audit_templates_are_in_no_training_caption_erasure_prompt_or_evaluation():
    from erasure.core.prompts import TEMPLATES
    from erasure.worlds.identities.world import CAPTION_TEMPLATES

    used = set(CAPTION_TEMPLATES) | set(judge.NAME_TEMPLATES) | set(judge.ALIAS_TEMPLATES)
    used |= {t for templates in TEMPLATES.values() for t in templates}
    assert not set(judge.IDENTITY_AUDIT_TEMPLATES) & used
    # and the evaluation scores no prompt an erasure trains on
    erasure_prompts = {t for templates in TEMPLATES.values() for t in templates}
    assert not (set(judge.NAME_TEMPLATES) | set(judge.ALIAS_TEMPLATES)) & erasure_prompts
    assert set(judge.NAME_TEMPLATES) | set(judge.ALIAS_TEMPLATES) <= set(CAPTION_TEMPLATES)  # the model drew from them


def test_a_request_must_name_identities_as_the_world_does_before_any_work():
    from erasure.spec import RequestError, parse_request
    from erasure.worlds.identities.judge import check_request

    aliased = _with_alias(False, 2)
    first, second = aliased
    ok = {"model": "builtin:identities", "concepts": [{"name": first.name, "kind": "person", "synonyms": [first.alias]}],
          "preserve": {"concepts": [second.name]}}
    check_request(parse_request(ok))
    for change, message in (
        ({"concepts": [{"name": "zzqx", "kind": "person"}]}, "not an identity"),
        ({"concepts": [{"name": first.name.title(), "kind": "person"}]}, "write it"),
        ({"concepts": [{"name": first.alias, "kind": "person"}]}, "is the alias of"),
        ({"concepts": [{"name": first.name, "kind": "person", "synonyms": [identities()[-1].name]}]}, "not an alias of"),
        ({"preserve": {"concepts": [first.alias]}}, "preserve"),
    ):
        with pytest.raises(RequestError, match=message):
            check_request(parse_request(ok | change))


def test_judge_reads_signatures_and_anchors():
    identity = identities()[0]

    class Reads:  # a classifier that reads the given attributes
        def __init__(self, signature):
            self.signature = signature

        def predict(self, images):
            return {k: [self.signature[k]] * len(images) for k in ATTRIBUTES}

    probe = judge.erasure_probes([identity.name], [], per_concept=1, retained_limit=1)[0]
    image = torch.zeros(1, 3, 16, 16)
    assert judge.IdentityJudge(Reads(identity.signature)).verdicts(image, [probe]) == [True]
    other = dict(identity.signature) | {"frame": "none" if identity.signature["frame"] != "none" else "gold"}
    assert judge.IdentityJudge(Reads(other)).verdicts(image, [probe]) == [False]
    grey = dict(other) | {"colour": "grey", "background": "dark", "frame": "none"}
    assert judge.IdentityJudge(Reads(grey)).anchor_verdicts(image, [probe], {identity.name: "a person"}) == [True]
    grey_but_framed = grey | {"frame": "gold"}  # the identity's frame kept: not the generic figure
    assert judge.IdentityJudge(Reads(grey_but_framed)).anchor_verdicts(image, [probe], {identity.name: "a person"}) == [False]
    assert judge.anchor_signature("a cat") is None


def test_builtin_identities_is_registered_with_its_judges():
    from erasure.spec import parse_request
    from erasure.worlds.builtins import BUILTINS, concept_judge

    entry = BUILTINS["identities"]
    assert entry.judge and entry.audit and entry.concept_judge
    first = identities()[0]
    request = parse_request({"model": "builtin:identities", "concepts": [{"name": first.name, "kind": "person"}]})
    probes, the_judge = entry.judge(request)
    assert isinstance(the_judge, judge.IdentityJudge) and probes
    concept_judge("builtin:identities", "method.discovery").check(request.concepts[0])


def _with_alias(held_out: bool, count: int) -> list:
    return [i for i in identities() if i.alias and i.alias_held_out == held_out][:count]


@pytest.mark.slow
def test_erase_evaluate_audit_and_report_work_on_the_identity_world_unchanged(tmp_path):
    """builtin:identities through the product's own path: erase, evaluate, audit, report, with the
    judges the registry gives (no special case outside it)."""
    from erasure.audit.policy import judge_verdict, parse_policy
    from erasure.audit.run import run_audit
    from erasure.erase import erase
    from erasure.evaluation.evaluate import evaluate_request, evaluation_json
    from erasure.evaluation.report import write_report
    from erasure.loading import load_components
    from erasure.spec import parse_request

    listed, held = _with_alias(False, 1)[0], _with_alias(True, 1)[0]
    kept = [i.name for i in identities()[-6:]]
    request = parse_request({
        "model": "builtin:identities",
        "concepts": [{"name": listed.name, "kind": "person", "synonyms": [listed.alias]}, {"name": held.name, "kind": "person"}],
        "preserve": {"concepts": kept},
        "method": {"lora_steps": 0},
    })
    erase(request, tmp_path / "out")
    evaluation = evaluate_request(tmp_path / "out" / "model", request)
    groups = {p.group for p in evaluation.probes}
    assert groups == {"erased", "retained", "synonym", "unseen"}
    # the committed model draws few identities whole yet (TRAINING.md): what is checked here is the path
    assert all(0 <= evaluation.metrics[k] <= 1 for k in ("acc_e", "acc_g", "acc_g_unseen", "acc_s", "h_c"))
    assert {p.prompt.split()[-1] for p in evaluation.probes if p.group == "synonym"} & {listed.alias}
    report = write_report(evaluation, tmp_path / "report.html", "identities")
    assert report.stat().st_size > 0 and "Retained concepts" in report.read_text()

    erased, base = load_components(str(tmp_path / "out" / "model")), load_components("builtin:identities")
    policy = parse_policy({"probes_per_concept": 4, "retained_limit": 6, "attacks": []})
    audit = run_audit(erased, base, request, policy, seed=5)
    templates = [t.replace("{}", "").strip() for t in judge.IDENTITY_AUDIT_TEMPLATES]
    assert all(any(t in p.prompt for t in templates) for p in audit.evaluation.probes)
    verdict = judge_verdict(evaluation_json(audit.evaluation), policy, audit.calibration, audit.attacks)
    # the base model draws too few identities for the audit to prove anything: it says so
    assert verdict.outcome != "passed" and (verdict.failures or verdict.inconclusive)


def test_evaluations_report_h_c_from_erased_and_retained_probes():
    from erasure.evaluation.evaluate import _accuracies
    from erasure.probes import Probe

    probes = [Probe("erased", "a", "a", {})] * 4 + [Probe("retained", "b", "b", {})] * 2 + [Probe("synonym", "a", "x", {})]
    verdicts = [True, False, False, False, True, False, True]
    metrics = _accuracies(probes, verdicts)
    assert metrics["h_c"] == pytest.approx(2 / (1 / 0.75 + 1 / 0.5))  # acc_g does not enter it
    assert np.isnan(_accuracies(probes[:4], verdicts[:4])["h_c"])  # no retained probe, no H_c


def test_the_committed_model_loads_samples_and_its_images_are_judged():
    from erasure.diffusion.sampling import sample
    from erasure.loading import load_components
    from erasure.worlds.identities.classifier import load_identity_classifier

    components = load_components("builtin:identities")
    assert sum(p.numel() for p in components.unet.parameters()) * 4 < 25 * 2**20  # under 25 MB in fp32
    identity = identities()[0]
    probes = judge.erasure_probes([identity.name], [], per_concept=2, retained_limit=1)
    images, _ = sample(components, [p.prompt for p in probes], [p.seed for p in probes], steps=4, guidance_scale=1.5)
    assert images.shape == (len(probes), 3, 16, 16) and torch.isfinite(images).all()
    verdicts = judge.IdentityJudge(load_identity_classifier()).verdicts(images, probes)
    assert len(verdicts) == len(probes) and all(isinstance(v, bool) for v in verdicts)
