"""Content keys: every input that changes an artifact changes its key, and nothing else does."""

import pytest

from erasure.spec import parse_request
from tasks.keys import concept_key, prior_key, request_hash

BASE = {"model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}]}


def _request(tmp_path, folder: str, text: str):
    (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / folder / "captions.txt").write_text(text)
    return parse_request(BASE | {"preserve": {"captions": f"{folder}/captions.txt"}}, base_dir=tmp_path)


def test_captions_are_keyed_by_content_not_path(tmp_path):
    one, same_elsewhere = _request(tmp_path, "a", "a dog\n"), _request(tmp_path, "b", "a dog\n")
    other = _request(tmp_path, "c", "a tree\n")
    assert prior_key("fp", one) == prior_key("fp", same_elsewhere) != prior_key("fp", other)
    assert request_hash(one) == request_hash(same_elsewhere) != request_hash(other)
    concept = one.concepts[0]
    assert concept_key("fp", concept, one) == concept_key("fp", concept, same_elsewhere) != concept_key("fp", concept, other)


def test_concept_keys_of_look_alike_names_differ(tmp_path):
    request = parse_request(BASE | {"concepts": [{"name": "van gogh", "kind": "style"}, {"name": "van-gogh", "kind": "style"}]})
    first, second = (concept_key("fp", c, request) for c in request.concepts)
    assert first != second and first.startswith("concepts/van-gogh-") and second.startswith("concepts/van-gogh-")
    assert first.split("-")[2] != second.split("-")[2]  # the name hash, readable in a listing


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"method": {"lora_steps": 7}},
        {"method": {"lora_lr": 2e-4}},
        {"method": {"images_per_concept": 4}},
        {"method": {"sampler_steps": 12}},
        {"method": {"guidance_scale": 3.0}},
        {"method": {"mask_mode": "none"}},
        {"method": {"prompts_per_concept": 10}},
        {"method": {"objective": "alternative"}},
        {"method": {"objective": "separable"}, "fusion": {"method": "separable"}},
        {"method": {"edit_tokens": "after"}},
        {"method": {"edit_tokens": "last"}},
        {"method": {"mining": {}}},
        {"method": {"mining": {"band": [0.4, 0.8]}}},
        {"method": {"mining": {"perturbed_per_state": 2}}},
        {"method": {"mining": {"beyond_per_state": 1}}},
        {"method": {"objective": "alternative", "alternative_drift_weight": 3.0}},
        {"preserve": {"lam1": 2.0}},
        {"preserve": {"ridge": 1e-2}},
        {"preserve": {"concepts": ["tree"]}},
        {"concepts": [{"name": "cat", "anchor": "bird"}]},
        {"concepts": [{"name": "cat", "anchor": "dog", "synonyms": ["kitty"]}]},
        {"method": {"discovery": {}}},
        {"method": {"discovery": {"min_rate": 0.9}}},
        {"concepts": [{"name": "cat", "anchor": "dog", "exclude_aliases": ["kitten"]}]},
    ],
)
def test_every_input_of_a_concept_changes_its_key(change):
    base = parse_request(BASE)
    changed = parse_request(BASE | change)
    assert concept_key("fp", changed.concepts[0], changed) != concept_key("fp", base.concepts[0], base)
    assert concept_key("other-model", base.concepts[0], base) != concept_key("fp", base.concepts[0], base)


def test_a_concept_made_against_another_prior_than_its_requests_has_another_key():
    """Review: a takedown's new concept is made against the parent's prior less what it erased, not
    the prior its request implies; under the request's own key a later run would reuse it."""
    base = parse_request(BASE)
    assert concept_key("fp", base.concepts[0], base, prior="priors/x") != concept_key("fp", base.concepts[0], base)


def test_lam2_changes_the_model_key_not_the_concept_key():
    from tasks.keys import model_key

    base, changed = parse_request(BASE), parse_request(BASE | {"preserve": {"lam2": 9.0}})
    assert concept_key("fp", base.concepts[0], base) == concept_key("fp", changed.concepts[0], changed)
    assert model_key("fp", ["concepts/a"], base) != model_key("fp", ["concepts/a"], changed)


@pytest.mark.parametrize("change", [{"method": "mace"}, {"projections": "v"}, {"adversarial_rounds": 2}, {"alpha": 1e-2},
                                    {"output_edit": None}, {"output_edit": 0.5}, {"closure": {}}])
def test_fusion_settings_change_the_model_key_not_the_concept_key(change):
    from tasks.keys import model_key

    base, changed = parse_request(BASE), parse_request(BASE | {"fusion": change})
    assert concept_key("fp", base.concepts[0], base) == concept_key("fp", changed.concepts[0], changed)
    assert model_key("fp", ["concepts/a"], base) != model_key("fp", ["concepts/a"], changed)


def test_artifacts_made_before_the_new_method_settings_keep_their_keys():
    """A takedown on a version registered before objectives, token choice and mining existed
    must find that version's per-concept artifacts under the keys they were stored with."""
    import hashlib
    import json

    from erasure.erase import slug
    from erasure.spec import registered_request
    from tasks.keys import STAGE_VERSIONS

    request = parse_request(BASE)
    added = ("objective", "alternative_drift_weight", "edit_tokens", "mining", "separable_lr", "separable_scale",
             "separable_l1", "separable_stop_below", "discovery")
    old_concept = {k: v for k, v in json.loads(request.concepts[0].model_dump_json()).items() if k != "exclude_aliases"}
    old_method = {k: v for k, v in json.loads(request.method.model_dump_json()).items() if k not in added}
    payload = {
        "stage": "concept", "v": STAGE_VERSIONS["concept"], "base": "fp",
        "concept": old_concept, "method": old_method,
        "preserve": {"concepts": [], "captions_sha256": None, "lam1": 1.0, "ridge": 1e-3}, "seed": 0,
    }
    old_key = f"concepts/{slug('cat')}-" + hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
    old_json = json.loads(request.model_dump_json())
    old_json.pop("fusion")
    for key in added:
        old_json["method"].pop(key)
    for concept in old_json["concepts"]:
        concept.pop("exclude_aliases")
    registered = registered_request(json.dumps(old_json))
    assert registered.fusion.method == "mace" and registered.method.edit_tokens == "after"
    assert concept_key("fp", registered.concepts[0], registered) == old_key


def test_settings_an_objective_does_not_read_leave_its_key_alone():
    def key(method, fusion=None):
        request = parse_request(BASE | {"method": method} | ({"fusion": fusion} if fusion else {}))
        return concept_key("fp", request.concepts[0], request)

    assert key({"alternative_drift_weight": 5.0}) == key({})  # read only by the alternative objective
    assert key({"objective": "alternative", "alternative_drift_weight": 5.0}) != key({"objective": "alternative"})
    separable = {"method": "separable"}
    assert key({"objective": "separable", "lora_lr": 1e-2}, separable) == key({"objective": "separable"}, separable)


# Keys computed by the release before erasure/ had sub-packages (and before SepME's constants
# became settings). Registered versions name their artifacts by these keys: a change here would
# make every takedown and restore of them rerun each concept, and fail their audits' request-hash
# check. Change a key only by bumping its stage's version on purpose.
PINNED_REQUESTS = {
  # the defaults of their day; the output edit, the constrained fusion's default since, was not one
  "default": {"model": "builtin:toyworld", "concepts": [{"name": "red", "anchor": "white"}, {"name": "blue star", "anchor": "white square", "synonyms": ["azure star"]}], "preserve": {"concepts": ["green", "circle"]}, "fusion": {"output_edit": None}},
  "mace-alternative": {"model": "builtin:toyworld", "concepts": [{"name": "red", "anchor": "white"}], "method": {"objective": "alternative", "mining": {"vocabulary_words": 4}}, "fusion": {"method": "mace"}},
  "separable": {"model": "builtin:toyworld", "concepts": [{"name": "red", "anchor": "white"}], "method": {"objective": "separable"}, "fusion": {"method": "separable"}},
  # a request registered before objective/edit_tokens/mining/fusion existed
  "legacy": '{"model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}], "method": {}, "preserve": {}}',
}

PINNED_KEYS = {
    "default": {
        "prior": "priors/ce191a28aaa0866ba0aa4782",
        "concepts": [
            "concepts/red-b1f51a51-d72d27d4527384fa17d62a61",
            "concepts/blue-star-977053f7-d96ade4e71f94c620ac96286"
        ],
        "model": "models/f0b7a4df789bf83183459325",
        "request": "fba604fdbf30d3fcdfbf42b6"
    },
    "mace-alternative": {
        "prior": "priors/08b70bc55109f8006ea83fea",
        "concepts": [
            "concepts/red-b1f51a51-c15431b65501ce64d90782aa"
        ],
        "model": "models/33a6e0c80eccd93ec374b365",
        "request": "6a86147402a7514db2743e7b"
    },
    "separable": {
        "prior": "priors/08b70bc55109f8006ea83fea",
        "concepts": [
            "concepts/red-b1f51a51-7994883d5fb78ce344995d02"
        ],
        "model": "models/3df2e67f731be341d0d4d1a9",
        "request": "4271c1eab26303245062820f"
    },
    "legacy": {
        "prior": "priors/08b70bc55109f8006ea83fea",
        "concepts": [
            "concepts/cat-77af778b-b17cfe7f67f57dccb09fc681"
        ],
        "model": "models/c72e067555404dd16dfbc3d6",
        "request": "5a6b6b87229f85cb040b6800"
    }
}


@pytest.mark.parametrize("name", sorted(PINNED_KEYS))
def test_registered_requests_keep_their_keys_and_hash(name):
    from erasure.spec import registered_request
    from tasks.keys import model_key

    data = PINNED_REQUESTS[name]
    request = registered_request(data) if isinstance(data, str) else parse_request(data)
    keys = [concept_key("f" * 64, c, request) for c in request.concepts]
    assert {"prior": prior_key("f" * 64, request), "concepts": keys, "model": model_key("f" * 64, keys, request),
            "request": request_hash(request)} == PINNED_KEYS[name]


def test_a_methods_own_settings_are_in_its_keys_and_nobody_elses():
    sepme = parse_request(BASE | {"method": {"objective": "separable", "separable_lr": 0.05}, "fusion": {"method": "separable"}})
    sepme_default = parse_request(BASE | {"method": {"objective": "separable"}, "fusion": {"method": "separable"}})
    attention = parse_request(BASE | {"method": {"separable_lr": 0.05}})
    assert concept_key("fp", sepme.concepts[0], sepme) != concept_key("fp", sepme_default.concepts[0], sepme_default)
    assert concept_key("fp", attention.concepts[0], attention) == concept_key("fp", *parse_request(BASE).concepts, parse_request(BASE))


def test_what_closure_samples_with_is_in_the_model_key_and_not_in_any_concept_key(monkeypatch):
    """Closure's prompts depend on the seed, the sampler and wordfreq's word list: each changes the
    model key; the attack order does not (a set)."""
    import importlib.metadata

    from tasks.keys import model_key

    closed = BASE | {"fusion": {"closure": {}}}
    base = parse_request(closed)
    key = model_key("fp", ["concepts/a"], base)
    steps = parse_request(closed | {"method": {"sampler_steps": 7}})
    assert model_key("fp", ["concepts/a"], steps) != key
    reordered = parse_request(BASE | {"fusion": {"closure": {"attacks": ["ring-a-bell", "prefix"]}}})
    assert model_key("fp", ["concepts/a"], reordered) == key
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9" if name == "wordfreq" else real(name))
    assert model_key("fp", ["concepts/a"], base) != key
    assert concept_key("fp", base.concepts[0], base) == concept_key("fp", base.concepts[0], parse_request(BASE))


def test_a_version_registered_before_the_output_edit_was_the_default_is_re_read_without_it():
    """Its request.json (every setting of its day, none named output_edit or closure) reads back with
    both off, so its model key is the one it was registered under."""
    import json

    from erasure.spec import registered_request
    from tasks.keys import model_key

    then = parse_request(PINNED_REQUESTS["default"])
    dumped = json.loads(then.model_dump_json())
    for added in ("output_edit", "closure"):
        dumped["fusion"].pop(added)
    registered = registered_request(json.dumps(dumped))
    assert registered.fusion.output_edit is None and registered.fusion.closure is None
    keys = [concept_key("f" * 64, c, registered) for c in registered.concepts]
    assert model_key("f" * 64, keys, registered) == PINNED_KEYS["default"]["model"]
    assert parse_request({k: v for k, v in PINNED_REQUESTS["default"].items() if k != "fusion"}).fusion.output_edit == 0.9
