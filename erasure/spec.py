"""The erasure request: what to erase, what to keep, and how.

A request is a YAML or JSON file validated by pydantic. Every error names the
field path (``concepts.1.anchor``) and says what would be valid. Checks that need
the model's tokenizer (a concept that tokenises to nothing) live in
``check_against_tokenizer`` and run once the model is loaded, before anything is
written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ConceptKind = Literal["object", "person", "style", "explicit"]

# The anchors MACE uses per kind (methods.md 1.2). Objects have no universal
# anchor: the user names one (e.g. "ground" or a neighbouring class).
DEFAULT_ANCHORS: dict[str, str | None] = {
    "person": "a person",
    "style": "art",
    "explicit": "a person wearing clothes",
    "object": None,
}

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny", "toyworld")
DEFAULT_MODEL = "builtin:toyworld"


class RequestError(ValueError):
    """A request that cannot be run, with a message that says what to fix."""


def normalise(text: str) -> str:
    """Case- and space-insensitive form used to compare concept names."""
    return " ".join(text.lower().split())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConceptSpec(_Strict):
    """One concept to erase.

    ``anchor`` is what the concept's prompts should look like to the model after
    erasure (the All-but-One "alternative"); ``synonyms`` are erased too and are
    what generality is measured on; ``prompts`` are extra user prompts that must
    not draw the concept (they join the augmented prompt set).
    """

    name: str = Field(min_length=1)
    kind: ConceptKind = "object"
    anchor: str | None = None
    synonyms: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()

    @field_validator("name", "anchor")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = " ".join(value.split())
        if not value:
            raise ValueError("must not be blank")
        return value

    @field_validator("synonyms")
    @classmethod
    def _clean_synonyms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(" ".join(s.split()) for s in value)
        if any(not s for s in cleaned):
            raise ValueError("synonyms must not be blank")
        return cleaned

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

    concepts: tuple[str, ...] = ()
    captions: Path | None = None
    lam1: float = Field(default=1.0, ge=0.0, description="prior weight in cross-attention refinement (CFR)")
    lam2: float = Field(default=1.0, ge=0.0, description="prior weight in the closed-form LoRA fusion")
    ridge: float = Field(
        default=1e-3, gt=0.0, description="ridge towards the current weights, relative to the mean eigenvalue"
    )

    @field_validator("concepts")
    @classmethod
    def _clean(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(" ".join(s.split()) for s in value)
        if any(not s for s in cleaned):
            raise ValueError("retained concepts must not be blank")
        return cleaned


class MethodSettings(_Strict):
    """MACE hyperparameters; defaults are the paper's (methods.md 1.1 and 1.3)."""

    images_per_concept: int = Field(default=8, ge=1)  # MACE: 8 images per concept
    # None: the model's own setting (erasure_defaults.json), else MACE's 30 steps / CFG 7.5
    sampler_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=1.0)
    lora_rank: int = Field(default=1, ge=1)  # MACE: rank 1
    lora_lr: float = Field(default=1e-4, gt=0.0)  # MACE: 1e-4 (objects 1e-5 in their configs)
    lora_steps: int = Field(default=50, ge=0)  # MACE: 50 (explicit content 120)
    importance_sampling: bool = True  # MACE: concept-focal importance sampling
    mask_mode: Literal["attention", "none"] = "attention"
    mask_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    prompts_per_concept: int = Field(default=30, ge=1)  # MACE: ~30 augmented prompts


class AuditSpec(_Strict):
    """What a compliance audit tolerates: above these, a concept has leaked."""

    max_acc_e: float = Field(default=0.25, ge=0.0, le=1.0)  # the concept drawn from its name
    max_acc_g: float = Field(default=0.35, ge=0.0, le=1.0)  # ... from synonyms and paraphrases


class ErasureRequest(_Strict):
    """A whole erasure job. ``model`` is a local diffusers folder, a hub id, or
    ``builtin:tiny`` / ``builtin:toyworld`` (the embedded default)."""

    model: str = DEFAULT_MODEL
    concepts: tuple[ConceptSpec, ...]
    preserve: PreserveSpec = PreserveSpec()
    method: MethodSettings = MethodSettings()
    audit: AuditSpec = AuditSpec()
    seed: int = 0

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
        if not model.startswith(BUILTIN_PREFIX):
            candidate = Path(model).expanduser()
            if not candidate.is_absolute():
                candidate = base_dir / candidate
            looks_local = model.startswith((".", "/", "~")) or candidate.exists() or model.count("/") != 1
            if looks_local:
                if not candidate.is_dir():
                    raise RequestError(
                        f"model: folder {str(candidate)!r} does not exist; give a diffusers folder, "
                        f"a hub id like 'org/name', or one of {', '.join(BUILTIN_PREFIX + m for m in BUILTIN_MODELS)}"
                    )
                updates["model"] = str(candidate.resolve())
        elif model[len(BUILTIN_PREFIX):] not in BUILTIN_MODELS:
            raise RequestError(
                f"model: unknown built-in {model!r}; valid: {', '.join(BUILTIN_PREFIX + m for m in BUILTIN_MODELS)}"
            )
        captions = self.preserve.captions
        if captions is not None:
            path = captions if captions.is_absolute() else base_dir / captions
            if not path.is_file():
                raise RequestError(f"preserve.captions: file {str(path)!r} does not exist")
            if not read_captions(path):
                raise RequestError(f"preserve.captions: file {str(path)!r} holds no caption (one caption a line)")
            updates["preserve"] = self.preserve.model_copy(update={"captions": path.resolve()})
        return self.model_copy(update=updates) if updates else self

    def check_against_tokenizer(self, tokenizer) -> None:
        """Reject concept names the model's tokenizer turns into no ordinary token at all
        (nothing, or only special tokens such as ``<|endoftext|>``): nothing to erase."""
        special = set(tokenizer.all_special_ids)
        for i, concept in enumerate(self.concepts):
            for variant in concept.variants:
                ids = [t for t in tokenizer(variant, add_special_tokens=False)["input_ids"] if t not in special]
                if not ids:
                    raise RequestError(
                        f"concepts.{i}.name: {variant!r} tokenises to nothing with this model's tokenizer; "
                        "use the words a prompt would use"
                    )

    def fingerprint_dict(self) -> dict:
        """Plain data of the request, for manifests and hashes."""
        return json.loads(self.model_dump_json())


def read_captions(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


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


def parse_request(data: dict, base_dir: Path | str = ".") -> ErasureRequest:
    """Validate plain data (already loaded from YAML/JSON) into a request."""
    if not isinstance(data, dict):
        raise RequestError("invalid request: the top level must be a mapping with 'model' and 'concepts'")
    try:
        request = ErasureRequest.model_validate(data)
    except ValidationError as error:
        raise RequestError(_format_validation_error(error)) from None
    return request.check_paths(Path(base_dir))


def load_request(path: Path | str) -> ErasureRequest:
    """Read and validate a ``.yaml``/``.yml``/``.json`` request file."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"request file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise RequestError(f"request file {str(path)!r} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {error}") from None
    return parse_request(data, base_dir=path.parent)
