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
        worker.run(ConceptJob.of(request, i, key, prior.key))

    def fuse(chosen):
        job = FuseJob(request.model, model_key(base, chosen, request), prior.key, tuple(chosen), request.preserve,
                      request.fusion, request.seed, None, None)
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
    assert not worker.store.exists("concepts/x")
