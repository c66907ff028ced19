"""Content-addressed artifact keys: a hash of everything that made the artifact.

Same inputs -> same key -> the work is skipped, across runs and across flows.
Bump a stage's version when its code changes what it produces.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from typing import get_args

from erasure.artifacts import slug
from erasure.spec import (
    HASH_NEUTRAL_CONCEPT_FIELDS,
    HASH_NEUTRAL_SETTINGS,
    LEGACY_SETTINGS,
    ConceptSpec,
    ErasureRequest,
    MethodSettings,
    RequestError,
    normalise,
)

STAGE_VERSIONS = {"prior": 1, "concept": 1, "model": 2}


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _preserve_inputs(request: ErasureRequest) -> dict:
    if request.preserve.captions is not None and request.preserve.captions_sha256 is None:
        raise RequestError(
            "preserve.captions has no content hash (a request validated by an earlier version?): "
            "run it again from its request file"
        )
    return {
        "concepts": list(request.preserve.concepts),
        "captions_sha256": request.preserve.captions_sha256,  # the content, not the path
    }


def prior_key(base_fingerprint: str, request: ErasureRequest) -> str:
    """The prior's key: the base model and what it preserves (retained concepts, the captions' content)."""
    payload = {"stage": "prior", "v": STAGE_VERSIONS["prior"], "base": base_fingerprint, **_preserve_inputs(request)}
    return f"priors/{_digest(payload)}"


def subtracted_prior_key(parent_prior_key: str, removed: tuple[str, ...]) -> str:
    """A prior that is ``parent_prior_key``'s less the retained concepts ``removed`` (a takedown of
    concepts the parent kept): named by where it came from, since its prompts are the parent's."""
    payload = {"stage": "prior-less", "v": STAGE_VERSIONS["prior"], "from": parent_prior_key,
               "removed": sorted(normalise(n) for n in removed)}
    return f"priors/{_digest(payload)}"


OBJECTIVES = set(get_args(MethodSettings.model_fields["objective"].annotation))
_misdeclared = {
    name: info.json_schema_extra["read_by"] for name, info in MethodSettings.model_fields.items()
    if info.json_schema_extra and not set(info.json_schema_extra.get("read_by", ())) <= OBJECTIVES
}
if _misdeclared:  # a mistyped reader would drop the setting from every key: reused artifacts it changed
    raise RuntimeError(f"MethodSettings fields read by unknown objectives: {_misdeclared}; objectives: {sorted(OBJECTIVES)}")


def _method_inputs(request: ErasureRequest) -> dict:
    """The method settings that made a concept's artifacts: those its objective reads (each field's
    declared ``read_by``), less settings added later while at the value every earlier artifact was
    made with (``LEGACY_SETTINGS``), so those artifacts keep their keys."""
    method = json.loads(request.method.model_dump_json())
    for name, info in MethodSettings.model_fields.items():
        read_by = (info.json_schema_extra or {}).get("read_by")
        if read_by is not None and request.method.objective not in read_by:
            method.pop(name)
    for key, value in LEGACY_SETTINGS["method"].items():
        if key in method and method[key] == value:
            method.pop(key)
    if request.method.discovery is not None:
        # the word list discovery screens comes from the wordfreq package: another release, other aliases
        method["discovery_vocabulary"] = "wordfreq " + importlib.metadata.version("wordfreq")
    if request.method.mining is not None:
        # mined neighbours changed meaning (they take their source's target; words join as
        # synonyms): artifacts mined before that must not be reused
        method["mining_version"] = 2
    return method


def _concept_inputs(concept: dict) -> dict:
    """A concept's fields less those added later while at the value earlier concepts had."""
    return {k: v for k, v in concept.items() if HASH_NEUTRAL_CONCEPT_FIELDS.get(k, object()) != v}


def concept_key(base_fingerprint: str, concept: ConceptSpec, request: ErasureRequest, prior: str | None = None) -> str:
    """A concept's key: the base model, the concept, the settings its objective reads, the preserve set and the seed;
    and ``prior``, the prior's key, when the concept is made against another prior than the one the
    request implies (a takedown's, which subtracted a retained concept from its parent's)."""
    payload = {
        "stage": "concept",
        "v": STAGE_VERSIONS["concept"],
        "base": base_fingerprint,
        "concept": _concept_inputs(json.loads(concept.model_dump_json())),
        "method": _method_inputs(request),
        "preserve": _preserve_inputs(request) | {"lam1": request.preserve.lam1, "ridge": request.preserve.ridge},
        "seed": request.seed,
    } | ({"prior": prior} if prior is not None else {})
    return f"concepts/{slug(concept.name)}-{_digest(payload)}"


def concept_slug(concept: ConceptSpec) -> str:
    """The part of a concept's key that names the concept (``key_slug`` of its key)."""
    return slug(concept.name)


def key_slug(key: str) -> str:
    """``concepts/<slug>-<digest>`` -> ``<slug>``: which concept a key is of."""
    return key.split("/", 1)[1].rsplit("-", 1)[0]


def model_key(base_fingerprint: str, concept_keys: list[str], request: ErasureRequest, prior: str | None = None) -> str:
    """An erased model's key: the base model, its concepts' keys (as a set) and the fusion's settings;
    and ``prior``, the prior's key, when it is not the one the request itself implies (concepts kept
    from a parent version, whose prior lost a retained concept: ``flows.erase.Inheritance``)."""
    payload = {
        "stage": "model",
        "v": STAGE_VERSIONS["model"],
        "base": base_fingerprint,
        "concepts": sorted(concept_keys),
        "lam2": request.preserve.lam2,
        "ridge": request.preserve.ridge,
        "fusion": _fusion_inputs(request),
    } | ({"prior": prior} if prior is not None else {})
    return f"models/{_digest(payload)}"


def _fusion_inputs(request: ErasureRequest) -> dict:
    """The fusion's settings, less those added later at the value earlier models were fused with;
    with closure, what its attacks draw with (``closure_inputs``)."""
    fusion = json.loads(request.fusion.model_dump_json())
    for key, value in HASH_NEUTRAL_SETTINGS["fusion"].items():
        if fusion.get(key) == value:
            fusion.pop(key)
    if request.fusion.closure is not None:
        # closure's attacks draw their words from the wordfreq package, and sample at the request's
        # seed and sampler settings: another release or setting, other prompts found
        fusion["closure_inputs"] = {
            "vocabulary": "wordfreq " + importlib.metadata.version("wordfreq"), "seed": request.seed,
            "sampler_steps": request.method.sampler_steps, "guidance_scale": request.method.guidance_scale,
        }
    return fusion


def concept_set_hash(request: ErasureRequest) -> str:
    """Which concepts a version erases, by normalised name, whatever their settings."""
    return _digest({"concepts": sorted(normalise(c.name) for c in request.concepts)})


def request_hash(request: ErasureRequest) -> str:
    """The request's content: the caption file counts by its hash, not by where it lay."""
    data = request.fingerprint_dict()
    data["preserve"].pop("captions", None)
    data["concepts"] = [_concept_inputs(concept) for concept in data["concepts"]]
    for section, values in HASH_NEUTRAL_SETTINGS.items():
        for key, value in values.items():
            if data[section].get(key) == value:
                data[section].pop(key)
    return _digest(data)


CAPTIONS_FILE = "captions.txt"


def captions_key(request: ErasureRequest) -> str:
    """Where a request's caption file is kept in the store: by its content hash, so any worker,
    and a restore years later on another machine, finds exactly the captions it was made with."""
    if request.preserve.captions_sha256 is None:
        raise RequestError("the request has no caption file (or was not validated with erasure.spec.parse_request)")
    return f"captions/{request.preserve.captions_sha256}"
