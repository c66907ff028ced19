"""A distributed run's stages on every family's pipeline, in one process (``tasks.worker``): the
prior, each concept and the fusion published on their own give the erased pipeline that
``erasure erase`` makes in one go, and a fusion of fewer published concepts (a restore) is the
erasure of those alone. The flows above these stages are family-free (``tests/test_family_flows.py``
runs them on SDXL through the command line)."""

import pytest
import torch

from erasure.architectures.tiny import FAMILIES, build_tiny_pipeline
from erasure.spec import parse_request

REQUEST = {
    "concepts": [{"name": "cat", "anchor": "bird"}, {"name": "car", "anchor": "truck"}],
    "preserve": {"concepts": ["dog", "tree"]},
    "method": {"lora_steps": 0, "prompts_per_concept": 4},
    "fusion": {"method": "mace"},
}


def _stages(worker, request):
    from tasks.jobs import ConceptJob, FuseJob, PriorJob
    from tasks.keys import concept_key, model_key, prior_key

    base = worker.base_fingerprint
    prior = PriorJob(request.model, prior_key(base, request), request.preserve, request.fusion, concepts=request.concepts)
    assert not worker.run(prior).reused
    keys = [concept_key(base, c, request) for c in request.concepts]
    for i, key in enumerate(keys):
        assert not worker.run(ConceptJob.of(request, i, key, prior.key)).reused
        assert worker.run(ConceptJob.of(request, i, key, prior.key)).reused  # a rerun resumes from what is published

    def fuse(chosen):
        job = FuseJob(request.model, model_key(base, chosen, request), prior.key, tuple(chosen), request.preserve,
                      request.fusion, seed=request.seed, sampler_steps=None, guidance_scale=None)
        worker.run(job)
        return job.key

    return keys, fuse


def _denoiser_weights(folder) -> dict[str, torch.Tensor]:
    from erasure.architectures.registry import load_pipeline

    pipe, architecture = load_pipeline(folder)
    return {k: v.clone() for k, v in architecture.denoiser(pipe).state_dict().items()}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "sd"])
def test_published_stages_fuse_to_the_one_process_erasure_and_a_subset_to_its_restore(family, tmp_path, monkeypatch):
    from erasure.erase_pipeline import erase_pipeline
    from tasks.worker import ConceptWorker

    monkeypatch.setenv("ERASURE_STATE_DIR", str(tmp_path / "state"))
    build_tiny_pipeline(family).save_pretrained(tmp_path / "base")
    request = parse_request(REQUEST | {"model": str(tmp_path / "base")})
    worker = ConceptWorker(str(tmp_path / "base"), str(tmp_path / "store"), device="cpu")
    keys, fuse = _stages(worker, request)

    both = worker.store.fetch(fuse(keys), tmp_path / "fetched-both")
    erase_pipeline(request, tmp_path / "one-process")
    one_process = _denoiser_weights(tmp_path / "one-process" / "model")
    fused = _denoiser_weights(both)
    base = _denoiser_weights(tmp_path / "base")
    assert any(not torch.equal(base[k], one_process[k]) for k in base)
    for name in base:
        assert torch.allclose(fused[name], one_process[name], atol=1e-6, rtol=0), name

    # a restore of car: the fusion of cat's published statistics alone is erasing cat alone
    restored = _denoiser_weights(worker.store.fetch(fuse(keys[:1]), tmp_path / "fetched-cat"))
    cat_only = parse_request(REQUEST | {"model": str(tmp_path / "base"), "concepts": REQUEST["concepts"][:1]})
    erase_pipeline(cat_only, tmp_path / "cat-alone")
    alone = _denoiser_weights(tmp_path / "cat-alone" / "model")
    for name in base:
        assert torch.allclose(restored[name], alone[name], atol=1e-6, rtol=0), name
    assert any(not torch.allclose(restored[k], fused[k], atol=1e-4) for k in base)


def test_a_family_worker_refuses_what_the_closed_form_cannot_do_before_any_work(tmp_path, monkeypatch):
    from erasure.spec import RequestError
    from tasks.jobs import ConceptJob
    from tasks.worker import ConceptWorker

    monkeypatch.setenv("ERASURE_STATE_DIR", str(tmp_path / "state"))
    build_tiny_pipeline("sdxl").save_pretrained(tmp_path / "base")
    request = parse_request(REQUEST | {"model": str(tmp_path / "base"), "method": {"lora_steps": 20}})
    worker = ConceptWorker(str(tmp_path / "base"), str(tmp_path / "store"), device="cpu")
    with pytest.raises(RequestError, match="method.lora_steps: 0"):
        worker.run(ConceptJob.of(request, 0, "concepts/x", "priors/y"))


def test_an_audit_whose_policy_asks_for_attacks_has_no_verdict_on_a_family_pipeline(tmp_path):
    """The attacks search text-encoder states of the UNet path: on a family they are not skipped
    silently (a pass without them would be a pass the policy did not allow)."""
    from erasure.architectures.base import LoadedPipeline
    from erasure.architectures.registry import architecture_of
    from erasure.audit.policy import AuditPolicy
    from erasure.audit.run import run_audit
    from erasure.errors import NoVerdict

    pipe = build_tiny_pipeline("sdxl")
    model = LoadedPipeline(pipe, architecture_of(pipe))
    pipe.save_pretrained(tmp_path / "sdxl")
    request = parse_request(REQUEST | {"model": str(tmp_path / "sdxl")})
    with pytest.raises(NoVerdict, match="search text-encoder states"):
        run_audit(model, model, request, AuditPolicy(attacks=("prefix",)), seed=0, attacks=True)


def _family_worker(tmp_path, monkeypatch, family="sdxl", change=None):
    from tasks.worker import ConceptWorker

    monkeypatch.setenv("ERASURE_STATE_DIR", str(tmp_path / "state"))
    pipe = build_tiny_pipeline(family)
    if change is not None:
        change(pipe)
    pipe.save_pretrained(tmp_path / "base")
    return ConceptWorker(str(tmp_path / "base"), str(tmp_path / "store"), device="cpu")


def test_a_family_base_with_nan_weights_is_refused_before_any_stage(tmp_path, monkeypatch):
    from erasure.spec import RequestError

    def corrupt(pipe):
        with torch.no_grad():
            pipe.unet.conv_out.weight[0, 0, 0, 0] = float("nan")

    with pytest.raises(RequestError, match="unet holds NaN or infinite weights"):
        _family_worker(tmp_path, monkeypatch, change=corrupt)


def test_a_takedown_of_a_retained_concept_subtracts_its_prompts_from_the_parent_prior_exactly(tmp_path, monkeypatch):
    from erasure.erase import retained_prompts
    from erasure.methods.pipeline_artifacts import load_stream_prior, stream_prior_lineage
    from erasure.methods.pipeline_edit import stream_priors
    from tasks.jobs import PriorJob
    from tasks.keys import prior_key, subtracted_prior_key

    worker = _family_worker(tmp_path, monkeypatch, "sd3")
    request = parse_request(REQUEST | {"model": str(tmp_path / "base")})
    parent = PriorJob(request.model, prior_key(worker.base_fingerprint, request), request.preserve, request.fusion)
    worker.run(parent)
    taken = request.model_copy(update={"preserve": request.preserve.model_copy(update={"concepts": ("dog",)})})
    job = PriorJob(taken.model, subtracted_prior_key(parent.key, ("tree",)), taken.preserve, taken.fusion,
                   subtract_from=parent.key, made_from=("dog", "tree"), removed=("tree",))
    assert not worker.run(job).reused

    before = load_stream_prior(worker.store.fetch(parent.key, tmp_path / "parent"))
    after_folder = worker.store.fetch(job.key, tmp_path / "after")
    after = load_stream_prior(after_folder)
    gone = stream_priors(worker.components.pipe, worker.components.architecture, retained_prompts(("dog", "tree"), ("tree",)))
    for stream in before:
        assert after[stream].count == before[stream].count - gone[stream].count
        assert torch.allclose(after[stream].total, before[stream].total - gone[stream].total, atol=1e-9)
    assert stream_prior_lineage(after_folder) == (("dog", "tree"), ("tree",))


def test_the_constrained_fusion_without_room_is_refused_at_the_prior_not_after_every_concept(tmp_path, monkeypatch):
    from erasure.spec import RequestError
    from tasks.jobs import PriorJob
    from tasks.keys import prior_key

    worker = _family_worker(tmp_path, monkeypatch)
    request = parse_request(REQUEST | {"model": str(tmp_path / "base"), "fusion": {"method": "constrained", "threshold": 1e-9},
                                       "preserve": {"concepts": ["dog", "tree", "horse"]}})
    job = PriorJob(request.model, prior_key(worker.base_fingerprint, request), request.preserve, request.fusion)
    with pytest.raises(RequestError, match="nothing left to edit"):
        worker.run(job)
    assert not worker.store.exists(job.key)


def test_an_audit_reads_a_family_request_that_the_erasure_path_would_refuse(tmp_path, monkeypatch):
    """A registered request is audited as it stands: `check_supported` is the erasure's gate, not the audit's."""
    from erasure.erase_pipeline import prepare_pipeline_request
    from erasure.spec import RequestError

    worker = _family_worker(tmp_path, monkeypatch)
    request = parse_request(REQUEST | {"model": str(tmp_path / "base"), "method": {"lora_steps": 50}})
    with pytest.raises(RequestError, match="lora_steps: 0"):
        prepare_pipeline_request(request, worker.components)
    prepared = prepare_pipeline_request(request, worker.components, erasing=False)
    assert prepared.method.sampler_steps == worker.components.sampler_defaults()[0]


def test_the_unconditional_drift_sees_a_denoiser_weight_changed_outside_the_edited_maps():
    from erasure.architectures.base import LoadedPipeline
    from erasure.architectures.registry import architecture_of
    from erasure.evaluation.metrics import unconditional_drift

    base_pipe, changed_pipe = build_tiny_pipeline("sdxl"), build_tiny_pipeline("sdxl")
    base = LoadedPipeline(base_pipe, architecture_of(base_pipe))
    changed = LoadedPipeline(changed_pipe, architecture_of(changed_pipe))
    assert unconditional_drift(changed, base) == 0.0  # the same weights draw the same images
    with torch.no_grad():
        changed_pipe.unet.conv_out.weight.mul_(-1.0)  # SDXL's unconditional states are zeros: no edited map sees this
    assert unconditional_drift(changed, base) > 0.1


def test_an_audit_of_a_model_of_another_family_than_its_base_is_refused_before_sampling(tmp_path, tiny):
    from erasure.architectures.base import LoadedPipeline
    from erasure.architectures.registry import architecture_of
    from erasure.audit.policy import AuditPolicy
    from erasure.audit.run import run_audit
    from erasure.spec import RequestError

    pipe = build_tiny_pipeline("sdxl")
    pipe.save_pretrained(tmp_path / "sdxl")
    request = parse_request(REQUEST | {"model": str(tmp_path / "sdxl")})
    with pytest.raises(RequestError, match="audit a model against the request it was erased with"):
        run_audit(tiny, LoadedPipeline(pipe, architecture_of(pipe)), request, AuditPolicy(attacks=()), seed=0)


def test_published_family_models_do_not_name_the_folder_they_were_loaded_from(tmp_path):
    import json

    from erasure.architectures.registry import load_pipeline, save_pipeline

    build_tiny_pipeline("flux").save_pretrained(tmp_path / "somewhere" / "base")
    pipe, _ = load_pipeline(tmp_path / "somewhere" / "base")
    save_pipeline(pipe, tmp_path / "saved")
    configs = [tmp_path / "saved" / "model_index.json", *(tmp_path / "saved").glob("*/config.json")]
    assert len(configs) > 3
    assert not any("somewhere" in path.read_text() for path in configs)
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def test_the_fingerprint_of_a_family_pipeline_covers_the_text_settings_of_its_machine(monkeypatch):
    from erasure.architectures import pixart
    from erasure.architectures.base import LoadedPipeline
    from erasure.architectures.registry import architecture_of
    from erasure.loading import model_fingerprint

    pipe = build_tiny_pipeline("pixart")
    model = LoadedPipeline(pipe, architecture_of(pipe))
    monkeypatch.setattr(pixart, "cleans_captions", lambda: False)
    plain = model_fingerprint(model)
    monkeypatch.setattr(pixart, "cleans_captions", lambda: True)
    assert model_fingerprint(model) != plain


def test_a_concept_made_on_another_family_is_refused_by_the_fusion(tmp_path):
    """Published statistics carry no family in their key's reading: the fusion checks their streams."""
    from erasure.architectures.registry import architecture_of
    from erasure.methods.pipeline_edit import ErasedConcept, PipelineEraser
    from erasure.spec import ConceptSpec, RequestError

    flux, pixart = build_tiny_pipeline("flux"), build_tiny_pipeline("pixart")
    made = PipelineEraser(pixart, architecture_of(pixart), [""], prompts_per_concept=2).concept(ConceptSpec(name="cat", anchor="bird"))
    fusing = PipelineEraser(flux, architecture_of(flux), [""], prompts_per_concept=2)
    with pytest.raises(RequestError, match="made on another model family"):
        fusing.include(made)
    tokens_only = ErasedConcept(made.concept, made.pairs, {"tokens": made.streams["tokens"], "pooled": made.streams["tokens"]})
    with pytest.raises(RequestError, match="of another width"):
        fusing.include(tokens_only)
    assert fusing.concepts == {}
