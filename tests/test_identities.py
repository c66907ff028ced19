"""The identity world: its names, renders, judge and committed model (fast checks)."""

import numpy as np
import pytest
import torch

from erasure.worlds.identities import judge
from erasure.worlds.identities.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    CLASSES,
    FRAME_RGB,
    GENERIC_WORDS,
    by_word,
    identities,
    identity_of,
    render_signature,
    sample_batch,
    signatures,
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


def test_signatures_cannot_exceed_the_combinations():
    assert len(signatures(1536)) == 1536
    with pytest.raises(ValueError, match="1536 signatures"):
        signatures(1537)


def test_renders_show_background_and_frame_and_are_deterministic():
    rng = np.random.default_rng(0)
    framed = {"shape": "circle", "colour": "red", "style": "solid", "background": "navy", "frame": "framed"}
    image = render_signature(framed, np.random.default_rng(3))
    assert tuple(image[0, 0]) == FRAME_RGB
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
    assert {p.prompt.split()[-1] for p in probes if p.group == "synonym"} <= {with_alias[0].alias, "outdoors"}
    assert all(p.concept not in erased for p in probes if p.group == "retained")
    assert len({p.concept for p in probes if p.group == "retained"}) == 5
    assert len({p.seed for p in probes}) == len(probes)
    audit = judge.audit_probes(erased, [], 4, 5, seed=1, listed_aliases=listed)
    templates = {t.replace("{}", "") for t in judge.IDENTITY_AUDIT_TEMPLATES}
    assert all(any(t.strip() in p.prompt for t in templates) for p in audit)


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
    other = dict(identity.signature) | {"frame": "none" if identity.signature["frame"] == "framed" else "framed"}
    assert judge.IdentityJudge(Reads(other)).verdicts(image, [probe]) == [False]
    grey = dict(other) | {"colour": "grey"}
    assert judge.IdentityJudge(Reads(grey)).anchor_verdicts(image, [probe], {identity.name: "a person"}) == [True]
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
