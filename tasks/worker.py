"""A worker that holds one loaded base model and serves every model-bound stage.

Runs in-process or as a Ray actor (one per GPU, or one per CPU with one torch
thread). Each stage reads its inputs from, and publishes its output to, the
artifact store under a content key; a stage whose key is already published is
skipped, so a re-run resumes from whatever finished.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from erasure.architectures.base import LoadedPipeline
from erasure.architectures.registry import save_pipeline
from erasure.artifacts import (
    PRIOR_FILE,
    ConceptArtifact,
    load_concept,
    load_concept_images,
    load_prior,
    prior_lineage,
    save_concept,
    save_prior,
    summary_aliases,
)
from erasure.audit.closure import CLOSURE_FILE, ClosureConcept, closure_summary
from erasure.core.text import empty_prompt_states
from erasure.diffusion.models import sampler_settings, save_components, with_weights
from erasure.erase import (
    base_prior,
    check_judge_sees,
    closed_weights,
    closure_concept,
    editable_projector,
    erase_concept,
    fuse,
    prepare_request,
    without_retained,
)
from erasure.erase_pipeline import (
    check_pipeline_concepts,
    check_room_to_edit,
    fused_pipeline,
    pipeline_concept,
    pipeline_prior,
    pipeline_prior_without,
    prepare_pipeline_request,
)
from erasure.loading import load_model, model_fingerprint
from erasure.methods.fusion import fusion_solver
from erasure.methods.pipeline_artifacts import (
    load_stream_concept,
    load_stream_prior,
    save_stream_concept,
    save_stream_prior,
    stream_prior_lineage,
)
from erasure.spec import BUILTIN_PREFIX, check_concepts_against_tokenizer, inside_input_root
from tasks.jobs import (
    AuditJob,
    ConceptJob,
    EvaluateJob,
    FuseJob,
    Job,
    ModelReference,
    PriorJob,
    StageReport,
    StageResult,
)
from tasks.keys import CAPTIONS_FILE
from tasks.store import store_from_url


class ConceptWorker:
    """Holds one loaded base model; ``run`` serves every stage's job (``tasks.jobs``)."""

    def __init__(self, model: str, store_url: str, s3_endpoint: str | None = None, device: str | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"a GPU worker was asked for but CUDA is not available here (host {socket.gethostname()}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model
        if not model.startswith(BUILTIN_PREFIX) and Path(model).expanduser().is_dir():
            inside_input_root(Path(model), "model")  # checked again here: a registered request's path was checked elsewhere
        # a family's pipeline (SDXL, SD 3, FLUX, PixArt) with its adapter, or the UNet path's Components
        self.components = load_model(model, self.device)
        self.base_fingerprint = model_fingerprint(self.components)
        self.store = store_from_url(store_url, s3_endpoint)

    def info(self) -> dict:
        """What the pool checks before giving this worker work: the base model it holds, and where;
        ``pipeline_class``: a family's pipeline class (None on the UNet path)."""
        family = type(self.components.pipe).__name__ if isinstance(self.components, LoadedPipeline) else None
        return {"fingerprint": self.base_fingerprint, "host": socket.gethostname(), "pid": os.getpid(), "device": self.device,
                "pipeline_class": family}

    def run(self, job: Job) -> StageResult | StageReport | None:
        """Run one stage's job (``tasks.jobs``) on this worker's model."""
        handlers = {PriorJob: self._prior, ConceptJob: self._concept, FuseJob: self._fuse,
                    EvaluateJob: self._evaluate, AuditJob: self._audit}
        if isinstance(self.components, LoadedPipeline):  # the closed form through the family's adapter
            handlers |= {PriorJob: self._pipeline_prior, ConceptJob: self._pipeline_concept, FuseJob: self._pipeline_fuse}
        handler = handlers.get(type(job))
        if handler is None:
            raise TypeError(f"a worker runs the jobs of tasks.jobs, not {type(job).__name__}")
        return handler(job)

    def _prior(self, job: PriorJob) -> StageResult:
        """Publish the base prior's statistics under the job's key (skipped if published)."""
        # the request's concepts are checked even when the prior is reused: a takedown's new names
        # must fail here, before any concept's work, not in their own jobs beside the others
        check_concepts_against_tokenizer(job.concepts, self.components.tokenizer)
        for setting in job.judged:
            check_judge_sees(self.model, job.concepts, setting)
        if self.store.exists(job.key):
            return StageResult(job.key, reused=True)
        started = time.perf_counter()
        if job.subtract_from is not None:
            return self._subtracted_prior(job, started)
        with tempfile.TemporaryDirectory() as folder:
            preserve = self._fetched_captions(job, Path(folder))
            prior = base_prior(self.components, preserve, job.fusion)
            (Path(folder) / "prior").mkdir()
            save_prior(prior, Path(folder) / "prior" / PRIOR_FILE, made_from=preserve.concepts)
            self.store.publish(job.key, Path(folder) / "prior")
        return StageResult(job.key, reused=False, seconds=time.perf_counter() - started, worker=self._name())

    def _subtracted_prior(self, job: PriorJob, started: float) -> StageResult:
        """The parent's prior less the states of the retained concepts a takedown erases: nothing
        else is encoded again (a caption corpus stays as it was summed)."""
        with tempfile.TemporaryDirectory() as folder:
            fetched = self.store.fetch(job.subtract_from, Path(folder) / "parent")
            made_from, removed = prior_lineage(fetched) or (job.made_from, ())
            prior = without_retained(self.components, load_prior(fetched / PRIOR_FILE), made_from, job.removed)
            if job.fusion.method == "constrained":
                editable_projector(empty_prompt_states(self.components), prior.gram(), job.fusion)
            (Path(folder) / "prior").mkdir()
            save_prior(prior, Path(folder) / "prior" / PRIOR_FILE, made_from, (*removed, *job.removed))
            self.store.publish(job.key, Path(folder) / "prior")
        return StageResult(job.key, reused=False, seconds=time.perf_counter() - started, worker=self._name())

    def _concept(self, job: ConceptJob) -> StageResult:
        """Run every per-concept stage of the job's concept and publish it under its key."""
        if self.store.exists(job.key):
            return StageResult(job.key, reused=True)
        request = self._prepared(job.request(), job.index)  # one concept checked, not the whole request
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            prior = load_prior(self.store.fetch(job.prior_key, Path(folder) / "prior") / PRIOR_FILE)
            result = erase_concept(self.components, request.concepts[0], request, prior)
            summary = save_concept(result, Path(folder) / "concept")
            self.store.publish(job.key, Path(folder) / "concept")
        return StageResult(job.key, reused=False, seconds=time.perf_counter() - started, worker=self._name(), summary=summary)

    def _fuse(self, job: FuseJob) -> StageResult:
        """Closed-form fusion of the published concepts into an erased model (and, with
        ``fusion.closure``, its adversarial closure, whose record the model folder carries), published
        under the job's key."""
        if self.store.exists(job.key):
            return StageResult(job.key, reused=True, summary=self._closure_summary(job))
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            prior = load_prior(self.store.fetch(job.prior_key, folder / "prior") / PRIOR_FILE)
            if job.fusion.closure is None:
                weights = fuse(self.components, self._concepts(list(job.concept_keys), folder), prior, job.preserve, job.fusion)
            else:
                items: list[ClosureConcept] = []  # filled as the solver reads the concepts
                concepts = self._concepts(list(job.concept_keys), folder, items, job.seed)
                solve = fusion_solver(self.components, concepts, prior, job.preserve, job.fusion)
                if len(items) != len(job.concept_keys):
                    raise RuntimeError(f"closure read {len(items)} of the job's {len(job.concept_keys)} concepts")
                steps, guidance = sampler_settings(self.components, job.sampler_steps, job.guidance_scale)
                weights, closure = closed_weights(self.components, self.model, items, solve, job.fusion.closure, steps, guidance)
            save_components(with_weights(self.components, weights), folder / "model")  # the base stays the base
            if job.fusion.closure is not None:  # inside the model: one publish, the record and the weights it made
                closure.save(folder / "model" / CLOSURE_FILE)
            self.store.publish(job.key, folder / "model")
        # what was published (a racing writer's stands, record and weights together)
        return StageResult(job.key, reused=False, seconds=time.perf_counter() - started, worker=self._name(),
                           summary=self._closure_summary(job))

    def _closure_summary(self, job: FuseJob) -> dict:
        """A published model's closure record, summarised, read alone from the store; {} without closure."""
        if job.fusion.closure is None:
            return {}
        with tempfile.TemporaryDirectory() as folder:
            fetched = self.store.fetch(job.key, Path(folder), only=[CLOSURE_FILE])
            return {"closure": closure_summary(json.loads((fetched / CLOSURE_FILE).read_text()))}

    def _prepared(self, request, first_index: int = 0, erasing: bool = True):
        """The request checked against this worker's model, its sampler defaults filled in;
        ``erasing`` False (an evaluation, an audit): what the erasure path supports is not asked."""
        if isinstance(self.components, LoadedPipeline):
            return prepare_pipeline_request(request, self.components, first_index, erasing)
        return prepare_request(request, self.components, first_index)

    # A family's pipeline: the same three stages, each a piece of ``erasure.erase_pipeline``; the
    # prior and the concepts hold one entry per text stream (``erasure.methods.pipeline_artifacts``).

    def _pipeline_prior(self, job: PriorJob) -> StageResult:
        """Publish every stream's base prior; a takedown's is its parent's less the retained
        concepts it erases (``erasure.erase_pipeline.pipeline_prior_without``), as on the UNet path."""
        check_pipeline_concepts(self.components, job.concepts)
        if self.store.exists(job.key):
            return StageResult(job.key, reused=True)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            if job.subtract_from is not None:
                fetched = self.store.fetch(job.subtract_from, Path(folder) / "parent")
                made_from, removed = stream_prior_lineage(fetched)
                made_from = made_from or job.made_from  # a prior that records no lineage: the parent's own retained set
                prior = pipeline_prior_without(self.components, load_stream_prior(fetched), made_from, job.removed)
                removed = (*removed, *job.removed)
            else:
                preserve = self._fetched_captions(job, Path(folder))
                prior, made_from, removed = pipeline_prior(self.components, preserve), preserve.concepts, ()
            check_room_to_edit(self.components, prior, job.fusion)
            (Path(folder) / "prior").mkdir()
            save_stream_prior(prior, Path(folder) / "prior", made_from, removed)
            self.store.publish(job.key, Path(folder) / "prior")
        return StageResult(job.key, reused=False, seconds=time.perf_counter() - started, worker=self._name())

    def _pipeline_concept(self, job: ConceptJob) -> StageResult:
        if self.store.exists(job.key):
            return StageResult(job.key, reused=True)
        request = self._prepared(job.request(), job.index)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            prior = load_stream_prior(self.store.fetch(job.prior_key, Path(folder) / "prior"))
            erased = pipeline_concept(self.components, request, prior)
            summary = save_stream_concept(erased, Path(folder) / "concept", self.components.architecture.family)
            self.store.publish(job.key, Path(folder) / "concept")
        return StageResult(job.key, reused=False, seconds=time.perf_counter() - started, worker=self._name(), summary=summary)

    def _pipeline_fuse(self, job: FuseJob) -> StageResult:
        """The erased pipeline of the published concepts, saved in its class's diffusers layout."""
        if self.store.exists(job.key):
            return StageResult(job.key, reused=True)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            prior = load_stream_prior(self.store.fetch(job.prior_key, folder / "prior"))

            def concepts():
                for i, key in enumerate(job.concept_keys):  # one at a time, each folder deleted once read
                    fetched = self.store.fetch(key, folder / f"c{i}")
                    yield load_stream_concept(fetched)
                    shutil.rmtree(fetched, ignore_errors=True)

            erased = fused_pipeline(self.components, job.preserve, job.fusion, prior, concepts())
            save_pipeline(erased, folder / "model")
            self.store.publish(job.key, folder / "model")
        return StageResult(job.key, reused=False, seconds=time.perf_counter() - started, worker=self._name())

    def _fetched_captions(self, job: PriorJob, folder: Path):
        """The job's preserve set, its captions as the store holds them (by content hash): the
        request's path is the submitting machine's, which a remote worker or a later restore may not have."""
        if job.preserve.captions is None:
            return job.preserve
        fetched = self.store.fetch(job.captions_key, folder / "captions")
        return job.preserve.model_copy(update={"captions": fetched / CAPTIONS_FILE})

    def _name(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def _concepts(
        self, keys: list[str], folder: Path, closure: list[ClosureConcept] | None = None, seed: int = 0
    ) -> Iterator[ConceptArtifact]:
        """The published concepts, fetched and read one at a time (the fusion's memory stays flat
        in their number), each folder deleted once read; with ``closure``, what closure needs of each
        (its images, its aliases) is appended to it as it is read."""
        for i, key in enumerate(keys):
            fetched = self.store.fetch(key, folder / f"c{i}")
            artifact = load_concept(fetched)
            if closure is not None:
                aliases = summary_aliases(artifact.summary) or ()
                closure.append(closure_concept(artifact.concept, load_concept_images(fetched), aliases, seed))
            shutil.rmtree(folder / f"c{i}", ignore_errors=True)
            yield artifact

    def _evaluate(self, job: EvaluateJob) -> StageReport | None:
        """Metrics and HTML report of a published erased model (``model_key``), or of the base
        model itself (None); None when the base model has no judge."""
        from erasure.evaluation.evaluate import evaluate_request, evaluation_json, has_judge
        from erasure.evaluation.report import write_report

        if not has_judge(job.request.model):
            return None
        request = self._prepared(job.request, erasing=False)
        with tempfile.TemporaryDirectory() as folder:
            model = self.store.fetch(job.model_key, Path(folder) / "model") if job.model_key else self.components
            result = evaluate_request(model, request, device=self.device, base_components=self.components)
            report = write_report(result, Path(folder) / "report.html", title=f"Erasure report: {job.model_key or self.model}")
            return StageReport(evaluation_json(result), report.read_text())

    def _audit(self, job: AuditJob) -> StageReport:
        """A compliance audit of the job's target against this worker's base model (``AuditJob``)."""
        from erasure.audit.run import run_audit
        from erasure.evaluation.evaluate import evaluation_json
        from erasure.evaluation.report import write_report

        request, target = self._prepared(job.request, erasing=False), job.target
        with tempfile.TemporaryDirectory() as folder:
            if isinstance(target, ModelReference):
                store = store_from_url(target.store_url, target.s3_endpoint)
                path = store.fetch(target.model_key, Path(folder) / "model", expect_sha256=target.sha256)
                model = load_model(str(path), self.device)
            elif target is not None:
                model = load_model(str(inside_input_root(Path(target), "model")), self.device)
            else:
                model = self.components
            result = run_audit(model, self.components, request, job.policy, job.seed, attacks=job.attacks, device=self.device)
            title = f"Audit of {job.target_label or self.model} (seed {job.seed})"
            report = write_report(result.evaluation, Path(folder) / "report.html", title=title, attacks=result.attack_images)
            return StageReport(evaluation_json(result.evaluation), report.read_text(), result.summary())
