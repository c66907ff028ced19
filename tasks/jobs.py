"""The pipeline's stages, defined once: what each worker call takes (a small typed job) and returns.

A flow builds a job per stage call (keys from ``tasks.keys``), the Prefect task in
``tasks.stages`` hands it to the Ray pool (``WorkerPool.run``), and the worker that
holds the base model runs it (``ConceptWorker.run``). A job carries only what its stage
reads: a concept's job holds that concept and the settings, never the whole request,
so fanning out N concepts ships and checks N concepts, not N x N.

| job           | stage     | reads                         | publishes / returns            |
|---------------|-----------|-------------------------------|--------------------------------|
| PriorJob      | prior     | preserve set, captions        | priors/<key>                   |
| ConceptJob    | concept   | one concept, the prior        | concepts/<key>                 |
| FuseJob       | fuse      | the concepts, the prior       | models/<key>                   |
| EvaluateJob   | evaluate  | an erased model, the request  | metrics and report             |
| AuditJob      | audit     | a model, the request, policy  | metrics, summary and report    |

The first three publish an artifact and return a ``StageResult``; a job whose key is
already published is skipped (``reused``), so a rerun resumes from what finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from erasure.audit.policy import AuditPolicy
from erasure.spec import ConceptSpec, ErasureRequest, FusionSettings, MethodSettings, PreserveSpec


@dataclass(frozen=True)
class ModelReference:
    """Where an erased model's weights are: the store (``store_url``, ``s3_endpoint``), its key and
    the digest of its manifest. A registered version keeps it in its logged pyfunc's config, with
    the hash of the request it was registered with; nothing is copied into MLflow."""

    store_url: str
    model_key: str
    sha256: str
    s3_endpoint: str | None = None
    request_hash: str | None = None

    def as_config(self) -> dict:
        return {"store_url": self.store_url, "s3_endpoint": self.s3_endpoint, "model_key": self.model_key,
                "sha256": self.sha256, "request_hash": self.request_hash}

    @classmethod
    def from_config(cls, config: dict, what: str) -> ModelReference:
        missing = [k for k in ("store_url", "model_key", "sha256") if not (config or {}).get(k)]
        if missing:
            raise LookupError(f"{what} names no served model ({', '.join(missing)} missing)")
        return cls(config["store_url"], config["model_key"], config["sha256"], config.get("s3_endpoint") or None,
                   config.get("request_hash"))


@dataclass(frozen=True)
class PriorJob:
    """The prior stage: the statistics of the states that must keep their K/V (``erasure.erase.base_prior``)."""

    model: str
    key: str
    preserve: PreserveSpec
    fusion: FusionSettings  # the constrained fusion checks the prior leaves it room
    captions_key: str | None = None  # the caption file as the store holds it (by content hash)
    # the request's concepts, checked against the tokenizer once, before any concept's work
    concepts: tuple[ConceptSpec, ...] = ()
    # a takedown of retained concepts: this prior is ``subtract_from`` (the parent version's) less
    # the prompts of ``removed``, drawn for ``made_from`` (the parent's retained concepts, when the
    # parent's prior does not record its own)
    subtract_from: str | None = None
    made_from: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    # the request's settings that judge with the world's judge (``erasure.erase.judged_settings``): it must see each concept, checked here too
    judged: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return "prior"


@dataclass(frozen=True)
class ConceptJob:
    """One concept's stages (text statistics, CFR map, images and masks, LoRA: ``erasure.erase.erase_concept``)."""

    model: str
    key: str
    prior_key: str
    concept: ConceptSpec
    method: MethodSettings
    preserve: PreserveSpec
    fusion: FusionSettings
    seed: int
    index: int = 0  # the concept's place in the request (its error messages name concepts.<index>)

    @property
    def label(self) -> str:
        return f"concept {self.concept.name!r}"

    def request(self) -> ErasureRequest:
        """The concept as a one-concept request: what the per-concept science reads."""
        return ErasureRequest(
            model=self.model, concepts=(self.concept,), preserve=self.preserve, method=self.method,
            fusion=self.fusion, seed=self.seed,
        )

    @classmethod
    def of(cls, request: ErasureRequest, index: int, key: str, prior_key: str) -> ConceptJob:
        return cls(request.model, key, prior_key, request.concepts[index], request.method, request.preserve,
                   request.fusion, request.seed, index)


@dataclass(frozen=True)
class FuseJob:
    """The closed-form fusion of published concepts into one erased model (``erasure.methods.fusion.fuse``)."""

    model: str
    key: str
    prior_key: str
    concept_keys: tuple[str, ...]
    preserve: PreserveSpec
    fusion: FusionSettings
    # what fusion.closure samples with: the request's seed and sampler settings (None: the model's
    # own), as the model key hashes them (tasks.keys._fusion_inputs); no defaults, so none is forgotten
    seed: int
    sampler_steps: int | None
    guidance_scale: float | None

    @property
    def label(self) -> str:
        return f"fuse {len(self.concept_keys)} concepts" + (" with closure" if self.fusion.closure is not None else "")


@dataclass(frozen=True)
class EvaluateJob:
    """A registered candidate's evaluation: acc_e, acc_g, acc_s, drift and the report (the built-in worlds' judges)."""

    request: ErasureRequest
    model_key: str | None  # None: the base model itself

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def label(self) -> str:
        return "evaluate"


@dataclass(frozen=True)
class AuditJob:
    """A compliance audit under the deployment's policy (``erasure.audit.run.run_audit``)."""

    request: ErasureRequest
    # what is audited: a registered version's served model (fetched and checked against its
    # digest), a model folder on the worker, or None for the base model itself
    target: ModelReference | Path | None
    policy: AuditPolicy
    seed: int
    attacks: bool
    target_label: str = ""

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def label(self) -> str:
        return "audit"


Job = PriorJob | ConceptJob | FuseJob | EvaluateJob | AuditJob


@dataclass
class StageResult:
    """What a publishing stage did: its key, whether it was already published, its seconds."""

    key: str
    reused: bool
    seconds: float = 0.0
    worker: str | None = None  # host:pid of the actor that ran it
    summary: dict = field(default_factory=dict)  # a concept's row for the manifest


@dataclass
class StageReport:
    """An evaluation's or an audit's figures: metrics, the audit's summary, the HTML report."""

    metrics: dict
    report_html: str | None
    summary: dict = field(default_factory=dict)
