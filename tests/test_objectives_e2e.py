"""Every method, end to end on the committed toy model: erase, write, read back, restore."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

import erasure.erase as erase_module
from erasure.artifacts import PRIOR_FILE, load_concept, load_prior
from erasure.core.attention import cross_attention_projections
from erasure.core.text import encode_prompts
from erasure.loading import load_components
from erasure.methods.fusion import fused_weights, fusion_prior
from erasure.spec import parse_request

pytestmark = pytest.mark.slow  # every method through training, fusion and restore on the toy world

CONCEPTS = [{"name": "red", "anchor": "white"}, {"name": "circle", "anchor": "square"}]
METHOD = {"lora_steps": 2, "images_per_concept": 1, "prompts_per_concept": 4, "sampler_steps": 2}


@pytest.fixture(scope="module")
def toyworld():
    return load_components("builtin:toyworld")


METHODS = {
    "mace": ({}, {}),
    "constrained": ({}, {"method": "constrained"}),
    "constrained-v-rece": ({}, {"method": "constrained", "projections": "v", "adversarial_rounds": 2}),
    "span-mining": ({"edit_tokens": "span", "mining": {"vocabulary_words": 2}}, {"method": "constrained"}),
    "alternative": ({"objective": "alternative"}, {}),
    "separable": ({"objective": "separable"}, {"method": "separable"}),
}


def _request(concepts, per_concept, fusion):
    return parse_request({
        "model": "builtin:toyworld",
        "concepts": concepts,
        "preserve": {"concepts": ["green", "triangle"]},
        "method": METHOD | per_concept,
        "fusion": fusion,
        "seed": 1,
    })


def _saved(out):
    return cross_attention_projections(UNet2DConditionModel.from_pretrained(out / "model", subfolder="unet"))


@pytest.mark.parametrize("name", list(METHODS))
def test_erase_and_restore_with_every_method(name, toyworld, tmp_path):
    per_concept, fusion = METHODS[name]
    objective = per_concept.get("objective", "attention")
    request = _request(CONCEPTS, per_concept, fusion)
    out = tmp_path / "out"
    erase_module.erase(request, out)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["request"]["method"]["objective"] == objective
    base = cross_attention_projections(toyworld.unet)
    saved = _saved(out)
    assert any(not torch.equal(saved[n].weight, w.weight) for n, w in base.items())

    # the stored per-concept artifacts alone rebuild the erased weights (what takedown and restore use)
    concepts = [load_concept(out / "concepts" / erase_module.slug(c["name"])) for c in CONCEPTS]
    assert all(len(c.factors) == len(base) for c in concepts)
    prior = fusion_prior(load_prior(out / PRIOR_FILE), concepts)
    rebuilt = fused_weights(toyworld, concepts, prior, request.preserve, request.fusion)
    for name, weight in rebuilt.items():
        torch.testing.assert_close(weight, saved[name].weight, rtol=0, atol=1e-6)

    if objective == "separable":  # the unconditional prediction reads exactly the base's K/V
        empty = encode_prompts(toyworld, [""])[0]
        for name, projection in base.items():
            before, after = projection.weight.detach() @ empty.T, saved[name].weight.detach() @ empty.T
            assert float((after - before).norm() / before.norm()) < 1e-5, name

    if "mining" in per_concept:  # the words mined are on record
        summary = json.loads((out / "concepts" / erase_module.slug("red") / "concept.json").read_text())["summary"]
        assert summary["mined_words"] and all(0.5 <= cosine <= 0.9 for _, cosine in summary["mined_words"])

    # restore is exact: the model fused without "circle" from this run's artifacts is the model
    # erased with "red" alone
    restored = fused_weights(toyworld, concepts[:1], fusion_prior(load_prior(out / PRIOR_FILE), concepts[:1]),
                             request.preserve, request.fusion)
    alone = tmp_path / "alone"
    erase_module.erase(_request(CONCEPTS[:1], per_concept, fusion), alone)
    for name_, weight in _saved(alone).items():
        torch.testing.assert_close(restored[name_], weight.weight, rtol=0, atol=1e-6)
