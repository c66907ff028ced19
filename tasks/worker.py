"""A worker that holds one loaded base model and serves every model-bound stage.

Runs in-process or as a Ray actor (one per GPU, or one per CPU with one torch
thread). Each stage reads its inputs from, and publishes its output to, the
artifact store under a content key; a stage whose key is already published is
skipped, so a re-run resumes from whatever finished.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from erasure.artifacts import PRIOR_FILE, ConceptArtifact, load_concept, load_prior, save_concept, save_prior
from erasure.diffusion.models import fingerprint, save_components
from erasure.erase import base_prior, erase_concept, fuse, prepare_request, with_weights
from erasure.loading import load_components
from erasure.spec import ErasureRequest
from tasks.keys import CAPTIONS_FILE, captions_key
from tasks.store import store_from_url


class ConceptWorker:
    """Stages take the request as an ``ErasureRequest`` (Ray pickles it), not as JSON."""

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
        self.components = load_components(model, self.device)
        self.base_fingerprint = fingerprint(self.components)
        self.store = store_from_url(store_url, s3_endpoint)

    def info(self) -> dict:
        """What the pool checks before giving this worker work: the base model it holds, and where."""
        return {"fingerprint": self.base_fingerprint, "host": socket.gethostname(), "pid": os.getpid(), "device": self.device}

    def _request(self, request: ErasureRequest) -> ErasureRequest:
        if not isinstance(request, ErasureRequest):
            raise TypeError(f"stages take an ErasureRequest, not {type(request).__name__}")
        return prepare_request(request, self.components)

    def prior(self, request: ErasureRequest, key: str) -> dict:
        """Publish the base prior's statistics under ``key`` (skipped if published)."""
        if self.store.exists(key):
            return {"key": key, "reused": True}
        request = self._request(request)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            if request.preserve.captions is not None:
                # the captions as the store holds them (by content hash): the request's path is
                # the submitting machine's, which a remote worker or a later restore may not have
                fetched = self.store.fetch(captions_key(request), Path(folder) / "captions")
                preserve = request.preserve.model_copy(update={"captions": fetched / CAPTIONS_FILE})
                request = request.model_copy(update={"preserve": preserve})
            prior = base_prior(self.components, request)
            (Path(folder) / "prior").mkdir()
            save_prior(prior, Path(folder) / "prior" / PRIOR_FILE)
            self.store.publish(key, Path(folder) / "prior")
        return {"key": key, "reused": False, "seconds": time.perf_counter() - started}

    def concept(self, request: ErasureRequest, index: int, key: str, prior_key: str) -> dict:
        """Run every per-concept stage of concept ``index`` and publish it under ``key``."""
        if self.store.exists(key):
            return {"key": key, "reused": True}
        request = self._request(request)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            prior = load_prior(self.store.fetch(prior_key, Path(folder) / "prior") / PRIOR_FILE)
            result = erase_concept(self.components, request.concepts[index], request, prior)
            summary = save_concept(result, Path(folder) / "concept")
            self.store.publish(key, Path(folder) / "concept")
        return {
            "key": key, "reused": False, "seconds": time.perf_counter() - started, "summary": summary,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        }

    def fuse(self, request: ErasureRequest, concept_keys: list[str], prior_key: str, key: str) -> dict:
        """Closed-form fusion of the published concepts into an erased model, published under ``key``."""
        if self.store.exists(key):
            return {"key": key, "reused": True}
        request = self._request(request)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            prior = load_prior(self.store.fetch(prior_key, folder / "prior") / PRIOR_FILE)
            weights = fuse(self.components, self._concepts(concept_keys, folder), prior, request.preserve, request.fusion)
            save_components(with_weights(self.components, weights), folder / "model")  # the base stays the base
            self.store.publish(key, folder / "model")
        return {"key": key, "reused": False, "seconds": time.perf_counter() - started}

    def _concepts(self, keys: list[str], folder: Path) -> Iterator[ConceptArtifact]:
        """The published concepts, fetched and read one at a time (the fusion's memory stays flat
        in their number), each folder deleted once read."""
        for i, key in enumerate(keys):
            fetched = self.store.fetch(key, folder / f"c{i}")
            artifact = load_concept(fetched)
            shutil.rmtree(folder / f"c{i}", ignore_errors=True)
            yield artifact

    def evaluate(self, request: ErasureRequest, model_key: str | None) -> dict | None:
        """Metrics and HTML report of a published erased model (``model_key``), or of the base
        model itself (None); None when the base model has no judge."""
        from erasure.evaluation.evaluate import evaluate_request, evaluation_json, has_judge
        from erasure.evaluation.report import write_report

        request = self._request(request)
        if not has_judge(request.model):
            return None
        with tempfile.TemporaryDirectory() as folder:
            model = self.store.fetch(model_key, Path(folder) / "model") if model_key else self.components
            result = evaluate_request(model, request, device=self.device, base_components=self.components)
            report = write_report(result, Path(folder) / "report.html", title=f"Erasure report: {model_key or self.model}")
            return {"metrics": evaluation_json(result), "report_html": report.read_text()}

    def audit(self, request: ErasureRequest, target: dict, policy, seed: int, attacks: bool) -> dict:
        """A compliance audit of ``target`` against this worker's base model: ``{"reference": {...}}``
        (a registered version's own store_url, s3_endpoint, model_key, sha256: the artifact is fetched
        from there and checked against its recorded digest), ``{"folder": path}`` or ``{"base": True}``."""
        from erasure.audit.run import run_audit
        from erasure.evaluation.report import write_report

        request = self._request(request)
        with tempfile.TemporaryDirectory() as folder:
            if "reference" in target:
                reference = target["reference"]
                store = store_from_url(reference["store_url"], reference.get("s3_endpoint") or None)
                path = store.fetch(reference["model_key"], Path(folder) / "model", expect_sha256=reference["sha256"])
                model = load_components(str(path), self.device)
            elif "folder" in target:
                model = load_components(str(target["folder"]), self.device)
            else:
                model = self.components
            result = run_audit(model, self.components, request, policy, seed, attacks=attacks, device=self.device)
            title = f"Audit of {target.get('label') or self.model} (seed {seed})"
            report = write_report(result.evaluation, Path(folder) / "report.html", title=title, attacks=result.attack_images)
            from erasure.evaluation.evaluate import evaluation_json

            return {"metrics": evaluation_json(result.evaluation), "summary": result.summary(), "report_html": report.read_text()}

