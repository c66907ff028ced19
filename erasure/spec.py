"""The erasure request: what to erase, what to keep, and how.

A request is a YAML or JSON file validated by pydantic. Every error names the
field path (``concepts.1.anchor``) and says what would be valid. Checks that need
the model's tokenizer (a concept that tokenises to nothing) live in
``check_against_tokenizer`` and run once the model is loaded, before anything is
written.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from erasure.errors import ErasureError

ConceptKind = Literal["object", "person", "style", "explicit"]
CONCEPT_KINDS: tuple[str, ...] = get_args(ConceptKind)

# The anchors MACE uses per kind (docs/method.md, "Cross-attention refinement").
# Objects have no universal anchor: the user names one (e.g. "ground" or a
# neighbouring class).
DEFAULT_ANCHORS: dict[str, str | None] = {
    "person": "a person",
    "style": "art",
    "explicit": "a person wearing clothes",
    "object": None,
}

# Bounds on every request field: a request is refused, naming the field, before
# anything is loaded or computed. Generous for real use (SD-scale jobs erase
# ~100 concepts), small enough that a hostile request cannot exhaust a worker.
MAX_REQUEST_BYTES = 1 << 20  # a request file
MAX_TEXT_CHARS = 200  # a concept name, anchor, synonym or retained concept
MAX_PROMPT_CHARS = 1000  # a user prompt; the model path or hub id
MAX_CONCEPTS = 1000
MAX_SYNONYMS = 64  # per concept
MAX_PROMPTS = 256  # per concept
MAX_PRESERVED = 10_000
MAX_CAPTION_BYTES = 64 << 20
MAX_CAPTIONS = 1_000_000
MAX_SEED = 2**32 - 1

# Unicode categories refused in any text: control characters (Cc), format
# characters (Cf: zero-width spaces/joiners, bidi overrides, BOM), surrogates,
# private use, unassigned code points, line/paragraph separators. They make two
# names look equal while hashing differently, or hide text in reports and logs.
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


BUILTIN_PREFIX = "builtin:"
# the models this project builds itself; ``erasure.worlds.builtins`` says how to load and judge each
BUILTIN_MODELS = ("tiny", "toyworld", "toyworld-clip", "identities")
DEFAULT_MODEL = BUILTIN_PREFIX + "toyworld"


def builtin_names() -> list[str]:
    """Every ``builtin:<name>`` a request may name."""
    return [BUILTIN_PREFIX + name for name in BUILTIN_MODELS]


def check_builtin(model: str) -> str | None:
    """``builtin:<name>``'s name; None for anything else (a folder, a hub id). An unknown
    ``builtin:`` name is an error that lists the valid ones."""
    if not model.startswith(BUILTIN_PREFIX):
        return None
    name = model[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in {model!r}; valid: {', '.join(builtin_names())}")
    return name


def printable_text(value: str, limit: int) -> str:
    """``value`` with runs of spaces collapsed; refused when blank, longer than ``limit``
    or holding a character that is not printable text."""
    for char in value:
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            name = unicodedata.name(char, "control character")
            raise ValueError(f"contains U+{ord(char):04X} ({name}); use printable text only")
    value = " ".join(value.split())
    if not value:
        raise ValueError("must not be blank")
    if len(value) > limit:
        raise ValueError(f"is {len(value)} characters long; at most {limit}")
    return value


Text = Annotated[str, AfterValidator(lambda v: printable_text(v, MAX_TEXT_CHARS))]
Prompt = Annotated[str, AfterValidator(lambda v: printable_text(v, MAX_PROMPT_CHARS))]


class RequestError(ErasureError, ValueError):
    """A request that cannot be run, with a message that says what to fix."""

    retry_helps = False


def normalise(text: str) -> str:
    """The form concept names are compared in: Unicode compatibility form (NFKC: full-width
    letters, composed and decomposed accents and ligatures become one), case-folded, runs of
    spaces collapsed. Look-alikes from other scripts (a Cyrillic "а" in a Latin name) stay
    distinct: they are different words to a tokenizer too."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConceptSpec(_Strict):
    """One concept to erase.

    ``anchor`` is what the concept's prompts should look like to the model after
    erasure (the All-but-One "alternative"); ``synonyms`` are erased too and are
    what generality is measured on; ``prompts`` are extra user prompts that must
    not draw the concept (they join the augmented prompt set).
    """

    name: Text
    kind: ConceptKind = "object"
    anchor: Text | None = None
    synonyms: tuple[Text, ...] = Field(default=(), max_length=MAX_SYNONYMS)
    prompts: tuple[Prompt, ...] = Field(default=(), max_length=MAX_PROMPTS)
    # words or phrases alias discovery (``method.discovery``) must never take for this concept: the
    # operator's veto of an alias the report listed that should keep drawing
    exclude_aliases: tuple[Text, ...] = Field(default=(), max_length=MAX_SYNONYMS)

    @model_validator(mode="after")
    def _anchor(self) -> ConceptSpec:
        anchor = self.anchor if self.anchor is not None else DEFAULT_ANCHORS[self.kind]
        if anchor is None:
            raise ValueError(
                f"concept {self.name!r} of kind 'object' needs an explicit 'anchor' "
                "(what its prompts should draw instead, e.g. 'ground' or 'an animal')"
            )
        if normalise(anchor) == normalise(self.name):
            raise ValueError(f"concept {self.name!r} is equal to its anchor; choose a different anchor")
        object.__setattr__(self, "anchor", anchor)
        names = [normalise(self.name)] + [normalise(s) for s in self.synonyms]
        if normalise(anchor) in names[1:]:
            raise ValueError(f"anchor {anchor!r} of concept {self.name!r} is also one of its synonyms")
        return self

    @property
    def variants(self) -> tuple[str, ...]:
        """The name and its synonyms: every way of saying the concept that is erased."""
        return (self.name, *self.synonyms)


class PreserveSpec(_Strict):
    """What must not change: retained concepts, a caption corpus, and the weights.

    Weights are applied to per-state *averages* (see ``closed_form``), so
    ``lam1 = 1`` makes the whole prior weigh as much as one concept's states, no
    matter how many captions the corpus has.
    """

    concepts: tuple[Text, ...] = Field(default=(), max_length=MAX_PRESERVED)
    captions: Path | None = None
    # set when the request is loaded: the caption file's content hash, so keys,
    # stores and remote workers name the captions by content, never by path
    captions_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$")
    lam1: float = Field(default=1.0, ge=0.0, le=1e12, description="prior weight in cross-attention refinement (CFR)")
    lam2: float = Field(default=1.0, ge=0.0, le=1e12, description="prior weight in the closed-form LoRA fusion")
    ridge: float = Field(
        default=1e-3, gt=0.0, le=1.0, description="ridge towards the current weights, relative to the mean eigenvalue"
    )


class SamplingSettings(_Strict):
    """How images are drawn when neither the request nor the model says otherwise:
    MACE's 30 DDIM steps at guidance 7.5 (docs/method.md, "Data per concept"). A model
    folder overrides them in ``erasure_defaults.json`` (the toy world: 25 steps, CFG 1.5)."""

    sampler_steps: int = Field(default=30, ge=1, le=1000, description="DDIM sampler steps")
    guidance_scale: float = Field(default=7.5, ge=1.0, le=100.0, description="classifier-free guidance scale")


class MiningSettings(_Strict):
    """RealEra's neighbour mining (docs/method.md, "Neighbour mining (RealEra)"): states near a
    concept's (cosine in ``band``) are erased with it; states beyond it (cosine below the band)
    join the prior; words of the tokenizer's vocabulary whose prompt states fall in the band join
    the concept's prompts."""

    band: tuple[float, float] = Field(default=(0.5, 0.9), description="cosine to the concept's state: [low, high]")
    perturbed_per_state: int = Field(default=4, ge=0, le=16, description="perturbed copies per concept token state")
    beyond_per_state: int = Field(
        default=0, ge=0, le=8, description="beyond-concept copies per state (into the prior; see erasure.methods.mining)"
    )
    vocabulary_words: int = Field(default=0, ge=0, le=100, description="text neighbours mined per concept; 0: none")

    @field_validator("band")
    @classmethod
    def _band(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low < high < 1.0:
            raise ValueError(f"band {list(value)}: give [low, high] with 0 < low < high < 1 (cosine to the concept's state)")
        return value


class DiscoverySettings(_Strict):
    """Alias discovery (docs/method.md, "Alias discovery"): the words the base model draws as each
    concept, screened over an English vocabulary and confirmed by sampling and the world's judge;
    found aliases are erased with the concept."""

    # bounded so a request cannot make it run for days: at most 64 x 16 images per word of the name
    vocabulary: int = Field(default=30_000, ge=10, le=100_000, description="most frequent English words screened")
    screened: int = Field(default=2000, ge=3, le=20_000, description="kept by the text screen (cross-attention K/V) for the model screen")
    confirmed: int = Field(default=24, ge=1, le=64, description="kept by the model screen (one UNet step) for sampling")
    samples: int = Field(default=8, ge=2, le=16, description="images per candidate (and per control word)")
    controls: int = Field(default=8, ge=1, le=64, description="random vocabulary words sampled for the base rate")
    min_rate: float = Field(default=0.75, gt=0.0, le=1.0, description="share of a candidate's images the judge must see as the concept")
    p_value: float = Field(default=1e-3, gt=0.0, lt=1.0, description="how improbable that share must be at the base rate")
    max_per_word: int = Field(default=16, ge=1, le=64, description="aliases kept per word of the concept's name")
    max_phrases: int = Field(default=32, ge=1, le=MAX_SYNONYMS, description="alias phrases erased per concept")

    @model_validator(mode="after")
    def _can_find(self) -> DiscoverySettings:
        # the lowest base rate the controls can show is 1 / (controls * samples + 2): a candidate
        # drawn as the concept every time must beat p_value there, or nothing can ever be found
        floor = (1 / (self.controls * self.samples + 2)) ** self.samples
        if floor >= self.p_value:
            raise ValueError(
                f"with samples {self.samples} and controls {self.controls} no candidate can reach p_value {self.p_value:g} "
                f"(the best possible is {floor:.2g}): raise samples or controls, or raise p_value"
            )
        return self


class MethodSettings(_Strict):
    """MACE hyperparameters; defaults are the paper's (docs/method.md, "Data per concept" and "LoRA on attention")."""

    images_per_concept: int = Field(default=8, ge=1, le=256)  # MACE: 8 images per concept
    # None: the model's own setting (erasure_defaults.json), else SamplingSettings'
    sampler_steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=1.0, le=100.0)
    # ``read_by``: the objectives that read a setting; the others' artifacts do not depend on it
    # (their content keys leave it out: tasks.keys)
    lora_rank: int = Field(default=1, ge=1, le=64, json_schema_extra={"read_by": ["attention", "alternative"]})  # MACE: rank 1
    # MACE: 1e-4 (objects 1e-5 in their configs)
    lora_lr: float = Field(default=1e-4, gt=0.0, le=1.0, json_schema_extra={"read_by": ["attention", "alternative"]})
    lora_steps: int = Field(default=50, ge=0, le=100_000)  # MACE: 50 (explicit content 120)
    importance_sampling: bool = True  # MACE: concept-focal importance sampling
    mask_mode: Literal["attention", "none"] = "attention"
    mask_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    prompts_per_concept: int = Field(default=30, ge=1, le=1000)  # MACE: ~30 augmented prompts
    # what each concept trains: MACE's masked attention LoRA, All-but-One's guidance move to the
    # anchor with the unconditional prediction held still, or SepME's separable increment
    objective: Literal["attention", "alternative", "separable"] = "attention"
    alternative_drift_weight: float = Field(default=1.0, ge=0.0, le=1e6, json_schema_extra={"read_by": ["alternative"]})  # All-but-One's lambda
    # SepME's increment (docs/method.md, "SepME"): Adam's step, the initial scale of its factors,
    # the L1 weight that keeps it sparse, and the loss below which training stops
    separable_lr: float = Field(default=0.1, gt=0.0, le=10.0, json_schema_extra={"read_by": ["separable"]})
    separable_scale: float = Field(default=1e-3, gt=0.0, le=1.0, json_schema_extra={"read_by": ["separable"]})
    separable_l1: float = Field(default=1e-6, ge=0.0, le=1.0, json_schema_extra={"read_by": ["separable"]})
    separable_stop_below: float = Field(default=1e-4, ge=0.0, le=1.0, json_schema_extra={"read_by": ["separable"]})
    # which of a concept prompt's states CFR maps to the anchor prompt's: MACE's tokens *after* the
    # concept (its own left to the LoRA), or also its last token, or its whole span
    edit_tokens: Literal["after", "last", "span"] = "span"
    mining: MiningSettings | None = None  # RealEra's neighbour mining; None: off
    # alias discovery from the base model and its world's judge; None: off (a model with no judge
    # cannot confirm an alias)
    discovery: DiscoverySettings | None = None


class ClosureSettings(_Strict):
    """Adversarial closure (docs/method.md, "Adversarial closure"): rounds of prompt attacks on the
    fused model, over the erasure's own templates and seeds an audit never draws, whose found
    prompts are erased and the model fused again, until attack success there is at most
    ``max_success``. Judged by the world's judge, as alias discovery is."""

    # substitution is opt-in: on the toy world most words the model does not know draw a circle, so
    # its success there measures that fallback, not a leak (docs/method.md, "Adversarial closure")
    attacks: tuple[Literal["prefix", "ring-a-bell", "substitution"], ...] = Field(
        default=("prefix", "ring-a-bell"), min_length=1, description="which attacks each round runs (a set)"
    )
    rounds: int = Field(default=3, ge=1, le=8, description="re-fusions at most")
    max_success: float = Field(default=0.05, ge=0.0, lt=1.0, description="attack success on the training split to stop at")
    prompts: int = Field(default=2, ge=1, le=32, description="training prompts attacked per concept and round")
    top_k: int = Field(default=4, ge=1, le=16, description="candidates drawn per attack and prompt")
    images: int = Field(default=2, ge=1, le=16, description="images per candidate")
    draws: int = Field(default=4, ge=1, le=64, description="denoising draws that score each prefix and substitution")
    vocabulary: int = Field(default=1000, ge=10, le=30_000, description="most frequent English words the attacks use")

    @field_validator("attacks")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"attacks {list(value)}: name each attack once")
        return tuple(sorted(value))  # a set: the order they are listed in changes nothing (nor the model key)


class FusionSettings(_Strict):
    """How the concepts' per-concept terms become one model (docs/method.md, "Beyond MACE").

    ``mace``: MACE's least squares, the prior weighted by ``preserve.lam2``. ``constrained``:
    the edit confined to the directions the prior's states hardly use, the empty prompt's
    states held exactly (``lam2`` plays no part: the prior is a constraint, not a weight).
    ``separable``: SepME's increments, each in the null space of the prior, the empty prompt
    and the other concepts (needs ``method.objective: separable``).
    """

    method: Literal["mace", "constrained", "separable"] = Field(default="constrained", description="the solve")
    projections: Literal["kv", "v"] = Field(default="kv", description="edit keys and values, or values only")
    threshold: float = Field(
        default=1e-3, gt=0.0, lt=1.0,
        description="constrained and separable: a direction is free to edit when the Gram of the states it must "
        "keep (the prior; for separable also the other concepts) has an eigenvalue below threshold x its largest there",
    )
    alpha: float = Field(
        default=1e-4, gt=0.0, le=1e3, description="constrained: ridge, relative to the erased states' mean eigenvalue"
    )
    adversarial_rounds: int = Field(default=0, ge=0, le=3, description="RECE rounds after the solve")
    adversarial_ridge: float = Field(
        default=1e-3, gt=0.0, le=1e3, description="RECE's lam, relative to the mean eigenvalue of sum W*^T W*"
    )
    closure: ClosureSettings | None = Field(default=None, description="adversarial closure after the solve; None: off")
    output_edit: float | None = Field(
        default=0.9, gt=0.0, lt=1.0,
        description="constrained: also remove, from free directions the erased states do not span, the output directions "
        "holding this share of the erased states' outputs (docs/method.md, \"Output-side edit\"); None: off; "
        "unset under the other solves",
    )

    @model_validator(mode="before")
    @classmethod
    def _output_edit_is_the_constrained_fusions(cls, data):
        # its default (0.9) is the constrained fusion's; MACE's and SepME's solves have no free directions
        if isinstance(data, dict) and data.get("method", "constrained") != "constrained" and "output_edit" not in data:
            data = {**data, "output_edit": None}
        return data


class ErasureRequest(_Strict):
    """A whole erasure job. ``model`` is a local diffusers folder, a hub id, or a
    built-in model (``erasure.worlds.builtins``; ``builtin:toyworld`` is the default)."""

    model: Prompt = DEFAULT_MODEL
    concepts: tuple[ConceptSpec, ...] = Field(max_length=MAX_CONCEPTS)
    preserve: PreserveSpec = PreserveSpec()
    method: MethodSettings = MethodSettings()
    fusion: FusionSettings = FusionSettings()
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    @model_validator(mode="before")
    @classmethod
    def _no_audit_thresholds(cls, data):
        if isinstance(data, dict) and "audit" in data:
            raise ValueError(
                "audit: a request cannot set its own audit thresholds; they belong to the deployment's audit "
                "policy (`erasure audit --policy FILE`, or the audit deployment's parameters in prefect.yaml). "
                "Remove the `audit` section"
            )
        return data

    @field_validator("concepts")
    @classmethod
    def _concepts(cls, value: tuple[ConceptSpec, ...]) -> tuple[ConceptSpec, ...]:
        if not value:
            raise ValueError("list at least one concept to erase")
        seen: dict[str, str] = {}
        for concept in value:
            for variant in concept.variants:
                key = normalise(variant)
                if key in seen:
                    raise ValueError(f"duplicate concept {variant!r} (also given as {seen[key]!r})")
                seen[key] = variant
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> ErasureRequest:
        separable = (self.method.objective == "separable", self.fusion.method == "separable")
        if any(separable) and not all(separable):
            raise ValueError(
                "SepME's increments are fused only by the separable fusion and need nothing else: set both "
                "'method.objective: separable' and 'fusion.method: separable', or neither"
            )
        if all(separable) and self.method.mining is not None:
            raise ValueError(
                "method.mining with SepME: its neighbours would only widen the other concepts' protected "
                "subspace (the separable fusion has no targets for them); remove method.mining, or use "
                "fusion.method: constrained"
            )
        if all(separable) and (self.fusion.projections != "kv" or self.fusion.adversarial_rounds):
            raise ValueError(
                "fusion.method separable fuses SepME's increments on keys and values as they were trained, without "
                "adversarial rounds: remove fusion.projections and fusion.adversarial_rounds, or use fusion.method: "
                "constrained"
            )
        if self.fusion.output_edit is not None and self.fusion.method != "constrained":
            raise ValueError(
                "fusion.output_edit acts on the constrained fusion's free directions: set fusion.method: constrained, "
                "or remove fusion.output_edit"
            )
        if self.fusion.closure is not None and self.fusion.method == "separable":
            raise ValueError(
                "fusion.closure re-solves MACE's or the constrained fusion with the attacks' prompts added; SepME's "
                "increments have no targets to add them to: remove fusion.closure, or use fusion.method: constrained"
            )
        if self.fusion.closure is not None and self.method.lora_steps == 0:
            raise ValueError(
                "fusion.closure judges its attacks against each concept's images, and method.lora_steps: 0 draws "
                "none: set method.lora_steps above 0, or remove fusion.closure"
            )
        erased = {normalise(v): v for c in self.concepts for v in c.variants}
        for kept in self.preserve.concepts:
            if normalise(kept) in erased:
                raise ValueError(
                    f"{kept!r} is both erased and preserved; remove it from 'preserve.concepts' "
                    "or from 'concepts'"
                )
        return self

    def check_paths(self, base_dir: Path) -> ErasureRequest:
        """Resolve relative paths against the request file's folder and check they exist."""
        updates: dict = {}
        model = self.model
        if model.startswith(BUILTIN_PREFIX):
            try:
                check_builtin(model)
            except ValueError as error:
                raise RequestError(f"model: {error}") from None
        else:
            candidate = Path(model).expanduser()
            if not candidate.is_absolute():
                candidate = base_dir / candidate
            looks_local = model.startswith((".", "/", "~")) or candidate.exists() or model.count("/") != 1
            if looks_local:
                if not candidate.is_dir():
                    raise RequestError(
                        f"model: folder {str(candidate)!r} does not exist; give a diffusers folder, "
                        f"a hub id like 'org/name', or one of {', '.join(builtin_names())}"
                    )
                updates["model"] = str(inside_input_root(candidate.resolve(), "model"))
        captions = self.preserve.captions
        if captions is not None:
            path = inside_input_root((captions if captions.is_absolute() else base_dir / captions).resolve(), "preserve.captions")
            _, digest = read_captions(path)
            updates["preserve"] = self.preserve.model_copy(update={"captions": path.resolve(), "captions_sha256": digest})
        return self.model_copy(update=updates) if updates else self

    def check_against_tokenizer(self, tokenizer, first_index: int = 0) -> None:
        """Reject concept names the model's tokenizer turns into no ordinary token at all
        (nothing, or only special tokens such as ``<|endoftext|>``): nothing to erase.
        ``first_index``: where this request's concepts sit in the request the user wrote (a
        concept's own job checks one concept; the error still names its field)."""
        check_concepts_against_tokenizer(self.concepts, tokenizer, first_index)

    def specificity_warnings(self) -> list[str]:
        """What in this request is likely to damage retained concepts: said before the work starts."""
        warnings = []
        count, fusion = len(self.concepts), self.fusion
        if fusion.method == "mace" and count > 1 and self.preserve.lam2 < 4 * count:
            warnings.append(
                f"fusion.method mace with {count} concepts and preserve.lam2 {self.preserve.lam2:g}: the erased concepts "
                f"outweigh everything kept, so retained concepts will change (MACE's reference scales lam2 with the "
                f"concept count, about 8e3 per concept on SD). Use fusion.method: constrained (the default), or raise "
                f"preserve.lam2 to at least {4 * count}"
            )
        if not self.preserve.concepts and self.preserve.captions is None and count > 1:
            warnings.append(
                "preserve lists no concepts and no captions: only the empty prompt and the anchors are held still; "
                "list the neighbours that must survive (e.g. other styles of the same kind) in preserve.concepts"
            )
        if fusion.method == "constrained" and fusion.threshold > 0.05:
            warnings.append(
                f"fusion.threshold {fusion.threshold:g}: directions the retained states use up to {fusion.threshold:.0%} "
                "of their strongest are editable; retained concepts may change (the default is 0.001)"
            )
        if fusion.adversarial_rounds and fusion.method == "mace":
            warnings.append(
                "fusion.adversarial_rounds with fusion.method mace: RECE's adversarial terms are not constrained and cost "
                "specificity at scale; combine them with fusion.method: constrained"
            )
        return warnings

    def judged_settings(self) -> list[str]:
        """The settings that judge images with the model's world's judge (alias discovery, closure)."""
        settings = (("method.discovery", self.method.discovery), ("fusion.closure", self.fusion.closure))
        return [name for name, value in settings if value is not None]

    def fingerprint_dict(self) -> dict:
        """Plain data of the request, for manifests and hashes."""
        return json.loads(self.model_dump_json())


# Adding a setting (the rule; tests/test_keys.py's pinned keys fail until it is followed):
# - give it the default that reproduces what the code did before it existed;
# - add it to HASH_NEUTRAL_SETTINGS at that value: registered requests that predate it get it
#   filled in (``registered_request``), and content keys and the request hash leave it out at that
#   value (``tasks.keys``), so older versions keep their artifacts' keys and their recorded hash;
# - a method setting that only some objectives read declares them: ``json_schema_extra={"read_by": [...]}``.
# LEGACY_SETTINGS adds the settings that came before request hashes were recorded (they are in
# every recorded hash, so the hash keeps them); never extend that part.
HASH_NEUTRAL_SETTINGS = {
    # SepME's constants before they were settings
    "method": {
        "separable_lr": 0.1, "separable_scale": 1e-3, "separable_l1": 1e-6, "separable_stop_below": 1e-4,
        "discovery": None,
    },
    "fusion": {"closure": None, "output_edit": None},
}
# the same rule for a concept's own fields: left out of keys and hashes at these values
HASH_NEUTRAL_CONCEPT_FIELDS = {"exclude_aliases": []}
LEGACY_SETTINGS = {
    "method": {"objective": "attention", "edit_tokens": "after", "mining": None, **HASH_NEUTRAL_SETTINGS["method"]},
    "fusion": {"method": "mace", **HASH_NEUTRAL_SETTINGS["fusion"]},
}


def check_concepts_against_tokenizer(concepts, tokenizer, first_index: int = 0, preprocess=None) -> None:
    """``ErasureRequest.check_against_tokenizer`` for ``concepts``, the first at ``first_index``.
    ``preprocess``: what the pipeline does to a prompt's text before its tokenizer reads it.
    A bare word-start marker (SentencePiece's "▁", as T5 writes before an unknown word) is no
    token of the concept either."""
    special = set(tokenizer.all_special_ids)
    for i, concept in enumerate(concepts, start=first_index):
        for variant in concept.variants:
            text = preprocess(variant) if preprocess is not None else variant
            ids = [t for t in tokenizer(text, add_special_tokens=False)["input_ids"] if t not in special]
            ids = [t for t, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)) if token.strip("▁ ")]
            if not ids:
                raise RequestError(
                    f"concepts.{i}.name: {variant!r} tokenises to nothing with this model's tokenizer; "
                    "use the words a prompt would use"
                )


def registered_request(text: str) -> ErasureRequest:
    """A registered version's ``request.json``, with settings it predates filled in as it was made.
    Content that is not such a request (edited, truncated) is a ``RequestError``."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(data.get(s, {}), dict) for s in LEGACY_SETTINGS):
            raise ValueError("not a request object")
        data.pop("audit", None)  # thresholds once kept in the request; the deployment's policy decides now
        for section, values in LEGACY_SETTINGS.items():
            target = data.setdefault(section, {})
            for key, value in values.items():
                target.setdefault(key, value)
        return ErasureRequest.model_validate(data)
    except (ValueError, TypeError, RecursionError) as error:  # JSON and pydantic errors are ValueErrors
        raise RequestError(f"the registered request.json is not a valid request: {str(error)[:300]}") from None


INPUT_ROOT_VARIABLE = "ERASURE_INPUT_ROOT"


MAX_INPUT_ENTRIES = 100_000  # files and folders inside one input folder: a model's are a few dozen


def inside_input_root(path: Path, field: str) -> Path:
    """On a shared runner (a deployment's worker) requests may name files only under the folder
    the operator set in ``$ERASURE_INPUT_ROOT``: a request must not read the runner's secrets as
    captions or load an arbitrary folder as a model. ``path`` is resolved, then checked, and so is
    everything inside a folder (a symlinked ``unet/`` leading outside is refused too). Called
    wherever a path is used, not only where a request is first read: a registered request's paths
    were checked on another machine, or before the root was set. Unset (a laptop): any path."""
    root = os.environ.get(INPUT_ROOT_VARIABLE)
    if not root:
        return path
    top, resolved = Path(root).resolve(), Path(path).expanduser().resolve()
    if not resolved.is_relative_to(top):
        raise RequestError(f"{field}: {str(path)!r} is outside {INPUT_ROOT_VARIABLE} ({root}); put the file there")
    if resolved.is_dir():
        _check_tree_inside(resolved, top, field, root)
    return resolved


def _check_tree_inside(folder: Path, top: Path, field: str, root: str) -> None:
    seen, entries = {folder}, 0
    for current, folders, files in os.walk(folder, followlinks=True):
        for name in folders + files:
            entries += 1
            if entries > MAX_INPUT_ENTRIES:
                raise RequestError(f"{field}: {str(folder)!r} holds more than {MAX_INPUT_ENTRIES} files and folders")
            try:
                target = (Path(current) / name).resolve()
            except (RuntimeError, OSError):  # a symlink loop, or one that cannot be followed
                raise RequestError(f"{field}: {str(Path(current) / name)!r} inside {str(folder)!r} is a symlink that cannot be followed") from None
            if not target.is_relative_to(top):
                raise RequestError(
                    f"{field}: {str(Path(current) / name)!r} inside {str(folder)!r} leads outside {INPUT_ROOT_VARIABLE} "
                    f"({root}) (a symlink); copy what it points to into the folder instead"
                )
        kept = []
        for name in folders:  # a symlink loop would walk for ever: each real folder once (all resolved above)
            target = (Path(current) / name).resolve()
            if target not in seen:
                seen.add(target)
                kept.append(name)
        folders[:] = kept


def read_captions(path: Path, expected_sha256: str | None = None) -> tuple[list[str], str]:
    """The captions of a caption file (one a line) and the SHA-256 of its bytes, read once
    and bounded; refused when missing, too large, not UTF-8, empty, or (with
    ``expected_sha256``) not the file the request was validated with."""
    path = Path(path)
    where = f"preserve.captions: file {str(path)!r}"
    if not path.is_file():
        raise RequestError(f"{where} does not exist")
    with open(path, "rb") as f:
        data = f.read(MAX_CAPTION_BYTES + 1)
    if len(data) > MAX_CAPTION_BYTES:
        raise RequestError(f"{where} is larger than {MAX_CAPTION_BYTES >> 20} MiB; use a smaller caption corpus")
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise RequestError(f"{where} changed since the request was validated (content hash differs); run it again")
    try:
        lines = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise RequestError(f"{where} is not UTF-8 text") from None
    if not lines:
        raise RequestError(f"{where} holds no caption (one caption a line)")
    if len(lines) > MAX_CAPTIONS:
        raise RequestError(f"{where} holds {len(lines)} captions; at most {MAX_CAPTIONS}")
    for number, line in enumerate(lines, 1):
        try:
            printable_text(line, MAX_PROMPT_CHARS)
        except ValueError as error:
            raise RequestError(f"{where}, caption {number}: {error}") from None
    return lines, digest


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(request)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling"
        elif item["type"] == "missing":
            message = "required key is missing"
        lines.append(f"{where}: {message.removeprefix('Value error, ')}")
    return "invalid request:\n  " + "\n  ".join(lines)


def parse_concepts(data: list[dict]) -> list[ConceptSpec]:
    """Concept specs on their own (a takedown's new concepts), checked before any work starts."""
    concepts = []
    for index, item in enumerate(data):
        try:
            concepts.append(ConceptSpec.model_validate(item))
        except ValidationError as error:
            message = _format_validation_error(error).replace("invalid request:\n  ", "", 1)
            name = item.get("name") if isinstance(item, dict) else None
            raise RequestError(f"invalid concept {name!r} (concepts.{index}): {message}") from None
    return concepts


def parse_request(data: dict, base_dir: Path | str = ".") -> ErasureRequest:
    """Validate plain data (already loaded from YAML/JSON) into a request."""
    if not isinstance(data, dict):
        raise RequestError("invalid request: the top level must be a mapping with 'model' and 'concepts'")
    try:
        request = ErasureRequest.model_validate(data)
    except ValidationError as error:
        raise RequestError(_format_validation_error(error)) from None
    return request.check_paths(Path(base_dir))


class _RefusedYAML(yaml.MarkedYAMLError):
    """YAML that parses but that a request or policy file refuses; ``problem`` is ours to show."""


class _StrictLoader(yaml.SafeLoader):
    """YAML without anchors/aliases (a few aliases can expand into gigabytes, "billion laughs"),
    without duplicate keys (the second ``concepts:`` would silently replace the first) and with
    plain keys only (a list or mapping as a key is no setting's name)."""

    def fetch_alias(self):
        raise _RefusedYAML(problem="aliases (*name) are not allowed; write the value out", problem_mark=self.get_mark())

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: a list or a mapping used as a key
                raise _RefusedYAML(problem="a key must be a plain name, not a list or mapping", problem_mark=key_node.start_mark) from None
            if duplicate:
                raise _RefusedYAML(problem="a key appears twice; give each key once", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong with a YAML file and where (line, column), never what the line says: the file
    may not be what it was given as, and its lines may be secrets."""
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{error.problem if isinstance(error, _RefusedYAML) else 'not valid YAML'}{where}"


def _json_no_duplicates(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise RequestError(f"invalid request: key {key!r} appears twice; give each key once")
    return dict(pairs)


def load_request(path: Path | str) -> ErasureRequest:
    """Read and validate a ``.yaml``/``.yml``/``.json`` request file."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"request file {str(path)!r} does not exist")
    if path.stat().st_size > MAX_REQUEST_BYTES:
        raise RequestError(f"request file {str(path)!r} is larger than {MAX_REQUEST_BYTES >> 10} KiB")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_no_duplicates)
        else:
            data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError:
        raise RequestError(f"request file {str(path)!r} is not UTF-8 text") from None
    except RecursionError:
        raise RequestError(f"request file {str(path)!r} is nested too deeply to be a request") from None
    except json.JSONDecodeError as error:  # the position only: JSON's messages quote nothing
        raise RequestError(f"request file {str(path)!r} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    except yaml.YAMLError as error:
        raise RequestError(f"request file {str(path)!r}: {yaml_problem(error)}") from None
    return parse_request(data, base_dir=path.parent)
