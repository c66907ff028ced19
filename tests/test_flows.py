"""Flow logic that needs no services."""

import logging
from types import SimpleNamespace

import pytest

from erasure.spec import parse_request

# the tiny model's random 32-wide text encoder leaves the constrained fusion (the default) no null
# space to edit in: pipeline tests on it use MACE's fusion; the methods are tested on the toy world
TINY_FUSION = {"method": "mace"}


def test_a_takedown_refuses_a_parent_erased_from_another_base_model(monkeypatch):
    """builtin:toyworld changed from the CLIP world to the MiniLM world: a version erased from the
    old one must not be rebuilt silently on the new one."""
    import flows.erase as module

    ran = []
    monkeypatch.setattr(module, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(module, "worker_pool", lambda model, workers: SimpleNamespace(fingerprint="b" * 64, pipeline_class=None))
    monkeypatch.setattr(module, "_concept_stages", lambda *args: ran.append(args))
    request = parse_request({"model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}], "fusion": TINY_FUSION})
    with pytest.raises(module.BaseModelChanged, match="builtin:toyworld-clip"):
        module.run_erasure(request, "m", 1, "takedown", "3", parent_base="a" * 64)
    assert ran == []  # refused before any work


def test_a_takedown_of_a_preserved_concept_moves_it_from_preserve_to_erased():
    from erasure.spec import parse_concepts
    from flows.takedown import add_concepts, no_longer_preserved

    parent = SimpleNamespace(name="m", version="2")
    request = parse_request({"concepts": [{"name": "red", "anchor": "white"}], "preserve": {"concepts": ["blue", "green"]}})
    new = parse_concepts([{"name": "Blue", "anchor": "white"}])
    changed = add_concepts(parent, request, new)
    assert [c.name for c in changed.concepts] == ["red", "Blue"]
    assert changed.preserve.concepts == ("green",)
    assert no_longer_preserved(request, new) == ["blue"]


def test_bad_takedown_input_is_refused_before_any_flow_starts(monkeypatch):
    from typer.testing import CliRunner

    import flows.takedown
    from cli.main import app

    started = []
    monkeypatch.setattr(flows.takedown, "takedown_flow", lambda *args: started.append(args))
    result = CliRunner().invoke(app, ["takedown", "demo@candidate", "blue"])  # an object needs an anchor
    assert result.exit_code == 2 and started == []
    assert "invalid concept 'blue'" in result.output and "anchor" in result.output


def test_a_version_registered_without_evaluation_skips_only_the_evaluation(monkeypatch):
    """`takedown --no-evaluate`: fusion and registration as always, no sampling of the new version."""
    import flows.erase as erase_module
    from erasure.spec import parse_request

    calls = []
    from tasks.jobs import FuseJob, StageReport, StageResult

    def run_stage(job, workers):
        assert isinstance(job, FuseJob) and job.concept_keys == ("concepts/c",)
        calls.append("fuse")
        return StageResult(job.key, reused=False)  # what a worker's fuse returns

    monkeypatch.setattr(erase_module, "run_stage", run_stage)
    monkeypatch.setattr(erase_module, "evaluation_stage", lambda job, workers: calls.append("evaluate") or StageReport({"acc_e": 0.1}, "<html>"))
    monkeypatch.setattr(erase_module, "stage_model_reference", lambda key: {"model_key": key})
    registered = {}

    def register(name, reference, request_json, tags, params, metrics, report_html, keys, move):
        registered.update(params=params, metrics=metrics, report=report_html)
        calls.append("register")
        return {"name": name, "version": "2", "run_id": "r", "candidate": True, "reused_version": False}

    monkeypatch.setattr(erase_module, "stage_register", register)
    lock = type("Lock", (), {"ensure": lambda self: None})()
    request = parse_request({"concepts": [{"name": "red", "anchor": "white"}]})
    stages = {"base": "f" * 64, "prior_key": "priors/p", "keys": ["concepts/c"], "own": True}
    lineage = erase_module.Lineage(request, "1")
    seconds = {}
    erase_module._fuse_and_register(lineage, "m", 1, "takedown", stages, lock, False, seconds)
    assert calls == ["fuse", "register"] and registered["metrics"] == {} and registered["report"] is None
    assert registered["params"]["evaluated"] is False
    assert set(seconds) == {"fuse", "evaluate", "register"}  # each stage's wall time, returned by the flow
    calls.clear()
    erase_module._fuse_and_register(lineage, "m", 1, "takedown", stages, lock, True, seconds)
    assert calls == ["fuse", "evaluate", "register"] and registered["metrics"] == {"acc_e": 0.1}


def test_published_concepts_submit_no_task(monkeypatch):
    """A restore, or a takedown of one concept on a large model: the concepts already published
    cost a store lookup each, not a Prefect task and a Ray call."""
    import flows.erase as erase_module

    request = parse_request({"model": "builtin:tiny", "concepts": [{"name": n, "anchor": "house"} for n in ("cat", "dog", "car")]})
    from tasks.jobs import ConceptJob, StageResult
    from tasks.keys import concept_key, prior_key

    base = "b" * 64
    published = {prior_key(base, request), concept_key(base, request.concepts[0], request), concept_key(base, request.concepts[2], request)}
    submitted, priors = [], []

    class Future:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def submit(job, workers):
        assert isinstance(job, ConceptJob) and job.prior_key == prior_key(base, request)
        submitted.append(job.concept.name)
        return Future(StageResult(job.key, reused=False, worker="host:1"))

    def run_stage(job, workers):
        priors.append(job)

    monkeypatch.setattr(erase_module, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(erase_module, "worker_pool", lambda model, workers: SimpleNamespace(fingerprint=base, pipeline_class=None))
    monkeypatch.setattr(erase_module, "store_from_url", lambda *a: SimpleNamespace(exists=lambda key: key in published))
    monkeypatch.setattr(erase_module, "store_settings", lambda: ("file:///nowhere", None))
    monkeypatch.setattr(erase_module, "stage_captions", lambda request: None)
    run_stage.submit = submit
    monkeypatch.setattr(erase_module, "run_stage", run_stage)
    seconds = {}
    stages = erase_module._concept_stages(request, 1, seconds)
    assert submitted == ["dog"]  # only "dog" was missing
    # the prior was published: its job runs only to check the concepts' names before any concept's work
    assert [job.concepts for job in priors] == [request.concepts]
    assert stages["ran"] == [concept_key(base, request.concepts[1], request)] and stages["worker_of"] == {concept_key(base, request.concepts[1], request): "host:1"}
    assert len(stages["keys"]) == 3 and set(seconds) == {"prior", "concepts"}


def test_the_worker_pool_is_warmed_in_the_background_and_its_failures_left_to_the_flow(monkeypatch):
    """The command line starts the workers while Prefect starts its server; the flow's own
    ``worker_pool`` call then reuses them, or reports the error the warm-up met."""
    import threading

    import tasks.compute as compute

    calls = []

    def pool(model, size, replace=True):
        calls.append((model, size, threading.current_thread().name))
        assert replace is False  # a warm-up never replaces a pool a flow may be using
        if model == "broken":
            raise RuntimeError("no such model")

    rays = []
    monkeypatch.setattr(compute, "worker_pool", pool)
    monkeypatch.setattr(compute, "ensure_ray", lambda: rays.append(threading.current_thread().name))
    monkeypatch.setattr(compute, "_pools", {})
    compute.warm_pool(lambda: "builtin:tiny", 2).join(timeout=10)
    assert calls == [("builtin:tiny", 2, "erasure-warm-pool")]
    assert rays == [threading.main_thread().name]  # Ray's processes die with the thread that started them
    compute.warm_pool("broken", 1).join(timeout=10)  # logged, not raised: the flow says why
    assert calls[-1][0] == "broken"


def test_a_takedown_of_a_preserved_concept_says_before_it_starts_what_reruns(monkeypatch):
    """`takedown green` on the README example printed "5 ran, 0 reused" with no word before. Now
    green leaves the parent's prior by subtraction and the others keep their artifacts (issue 18);
    a parent registered before versions logged their artifact keys still reruns everything, and
    says so first."""
    from typer.testing import CliRunner

    import cli.pipeline
    import flows.takedown
    from cli.main import app

    parent = SimpleNamespace(name="demo", version="2", tags={})
    request = parse_request({"concepts": [{"name": "red", "anchor": "white"}, {"name": "circle", "anchor": "square"}],
                             "preserve": {"concepts": ["blue", "green"]}})
    monkeypatch.setattr(flows.takedown, "resolve", lambda reference: parent)
    monkeypatch.setattr(flows.takedown, "verified_request", lambda version: request)
    order = []
    monkeypatch.setattr(cli.pipeline, "warn", lambda messages: order.extend(f"warned: {m}" for m in messages))
    monkeypatch.setattr(cli.pipeline, "_warm_pool_for", lambda *args: order.append("workers"))
    monkeypatch.setattr(flows.takedown, "takedown_flow", lambda *args: order.append("flow") or {
        "name": "demo", "version": "3", "ran": [], "reused": []})
    for lineage, said in (
        ((["concepts/red-1-a", "concepts/circle-2-b"], "priors/p"), "green leaves the prior by subtraction"),
        (None, "all 3 concepts rerun"),
    ):
        monkeypatch.setattr(flows.takedown, "version_lineage", lambda version, request, found=lineage: found)
        order.clear()
        result = CliRunner().invoke(app, ["takedown", "demo/2", "green", "--anchor", "white"])
        assert result.exit_code == 0, result.output
        warned, *started = order
        assert "green is preserved in demo version 2" in warned and said.split(" ", 1)[1] in warned, warned
        assert started == ["workers", "flow"]  # said before anything started
    order.clear()
    quiet = CliRunner().invoke(app, ["takedown", "demo/2", "purple", "--anchor", "white"])
    assert quiet.exit_code == 0 and order == ["workers", "flow"]


def test_the_warm_up_thread_starts_only_once_sqlalchemy_orm_is_imported_whole():
    """Issue 22, finding 4: two takedowns at once crashed in 4 of 8 runs, because the warm-up
    thread (MLflow) and Prefect's start-up imported sqlalchemy.orm together. The race itself
    needs two processes' timing; this checks what prevents it, in a fresh interpreter."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import tasks.compute as compute\n"
        "seen = []\n"
        "compute.warm_pool = lambda model, workers: seen.append('sqlalchemy.orm' in sys.modules)\n"
        "from cli import pipeline\n"
        "pipeline._warm_pool_for('m@candidate', 1)\n"
        "print(seen)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[True]"


def test_a_family_request_the_workers_cannot_erase_is_refused_before_any_stage_even_where_the_flow_cannot_read_the_model(monkeypatch):
    """The flow's own check needs the model folder on its machine; the workers' pool says what they loaded."""
    import flows.erase as module
    from erasure.spec import RequestError

    ran = []
    monkeypatch.setattr(module, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(module, "pipeline_family", lambda model: None)  # a folder only the workers' nodes hold
    monkeypatch.setattr(module, "worker_pool", lambda model, workers: SimpleNamespace(
        fingerprint="b" * 64, pipeline_class="StableDiffusionXLPipeline"))
    monkeypatch.setattr(module, "_concept_stages", lambda *args: ran.append(args))
    request = parse_request({"model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}], "fusion": TINY_FUSION})
    with pytest.raises(RequestError, match="StableDiffusionXLPipeline is erased with the closed form alone"):
        module.run_erasure(request, "m", 1, "erase", None)
    assert ran == []
