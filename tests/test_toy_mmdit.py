"""The joint-attention toy world (``erasure.worlds.toyworld.mmdit``) on an untrained MMDiT: it saves
and loads, samples deterministically per seed, and the families' closed form erases it through its
adapter with retained conditioning exact and restore exact; its training resumes from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from erasure.architectures.base import LoadedPipeline, read_weight
from erasure.methods.pipeline_edit import PipelineEraser
from erasure.spec import ConceptSpec, FusionSettings
from erasure.worlds.toyworld.mmdit import (
    GUIDANCE,
    STEPS,
    ToyMMDiT,
    build_mmdit_pipeline,
    load_mmdit_world,
    save_mmdit_pipeline,
)

RED = ConceptSpec(name="red", anchor="white")
STAR = ConceptSpec(name="star", anchor="circle")
RETAINED = ["a blue square", "a green star"]


@pytest.fixture(scope="module")
def pipe():
    return build_mmdit_pipeline(seed=0)


def conditioning(pipe, prompts):
    """Per stream, what its edited map gives the prompts' states: everything the transformer reads of the text."""
    architecture = ToyMMDiT()
    states = architecture.states(pipe, prompts)
    return {s.name: states[s.name] @ read_weight(pipe.transformer, s.maps[0]).T for s in architecture.streams(pipe)}


def test_it_saves_and_loads_without_the_encoder_and_samples_per_seed(pipe, tmp_path):
    save_mmdit_pipeline(pipe, tmp_path / "model")
    assert not (tmp_path / "model" / "text_encoder").exists()  # the encoder is the installed package's, never copied
    loaded = load_mmdit_world(tmp_path / "model")
    assert isinstance(loaded, LoadedPipeline) and loaded.architecture.family == "toy-mmdit"
    for name, weight in pipe.transformer.state_dict().items():
        assert torch.equal(loaded.pipe.transformer.state_dict()[name], weight), name
    assert loaded.sampler_defaults() == (STEPS, GUIDANCE)  # what an evaluation of it samples with, read from its class
    together = loaded.sample(["a red circle", "a blue star"], [3, 4], 3, 2.0)
    alone = loaded.sample(["a blue star"], [4], 3, 2.0)
    assert together.shape == (2, 3, 16, 16) and torch.isfinite(together).all()
    assert torch.allclose(together[1], alone[0], atol=1e-5)  # image i depends on seeds[i] alone, not its batch
    with pytest.raises(FileNotFoundError, match="toyworld train --world mmdit"):
        load_mmdit_world(tmp_path / "missing")


def test_closed_form_keeps_retained_conditioning_exact_and_restores_exactly(pipe):
    eraser = PipelineEraser(pipe, ToyMMDiT(), ["", *RETAINED], fusion=FusionSettings(method="constrained", threshold=1e-9),
                            prompts_per_concept=2)
    eraser.add(RED)
    erased = eraser.erased_pipeline()
    before = conditioning(pipe, ["a red circle", "a white circle", *RETAINED, ""])
    after = conditioning(erased, ["a red circle", *RETAINED, ""])
    for stream, base in before.items():
        change = (after[stream][1:] - base[2:]).abs().max() / base[2:].abs().max()
        assert change < 1e-6, (stream, float(change))  # retained prompts and the unconditional input did not move
    for stream in before:  # the concept prompt's conditioning went toward its anchor's, in both streams
        assert (after[stream][0] - before[stream][1]).norm() < 0.95 * (before[stream][0] - before[stream][1]).norm(), stream

    mace = FusionSettings(method="mace")
    both = PipelineEraser(pipe, ToyMMDiT(), ["", *RETAINED], fusion=mace, prompts_per_concept=2)
    only_red = PipelineEraser(pipe, ToyMMDiT(), ["", *RETAINED], fusion=mace, prompts_per_concept=2)
    for concept in (RED, STAR):
        both.add(concept)
    only_red.add(RED)
    both.remove("star")
    for stream, maps in only_red.weights().items():
        for module, weight in maps.items():
            assert torch.allclose(both.weights()[stream][module], weight, atol=1e-6, rtol=0), module


def test_a_crashed_training_resumes_to_exactly_the_uninterrupted_run_and_refuses_other_settings(tmp_path):
    from erasure.worlds.toyworld.train_mmdit import train_mmdit

    settings = {"steps": 4, "batch": 4, "checkpoint_every": 1, "warmup": 1}
    straight, losses = train_mmdit(tmp_path / "straight", **settings)

    def crash(model):
        raise KeyboardInterrupt  # killed after step 2's checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_mmdit(tmp_path / "crashed", **settings, eval_every=2, evaluate=crash)
    lines = []
    resumed, rest = train_mmdit(tmp_path / "crashed", **settings, log=lines.append)
    assert "resumed from step 2" in lines and rest == losses[2:]
    for name, weight in load_mmdit_world(straight).pipe.transformer.state_dict().items():
        assert torch.equal(load_mmdit_world(resumed).pipe.transformer.state_dict()[name], weight), name

    with pytest.raises(ValueError, match="resume with those settings"):
        train_mmdit(tmp_path / "crashed", **settings | {"steps": 6})
    state = torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=True)
    torch.save(state | {"world": "minilm"}, tmp_path / "crashed" / "checkpoint.pt")
    with pytest.raises(ValueError, match="not 'mmdit'"):
        train_mmdit(tmp_path / "crashed", **settings)


def test_a_folder_it_was_not_trained_as_is_refused_with_what_to_fix(pipe, tmp_path):
    import json

    from erasure.spec import RequestError

    save_mmdit_pipeline(pipe, tmp_path / "model")
    index_file = tmp_path / "model" / "model_index.json"
    index = json.loads(index_file.read_text())
    for change in ({"max_tokens": 4}, {"_class_name": "StableDiffusion3Pipeline"}, {"text_encoder_package_version": "0.0.1"}):
        index_file.write_text(json.dumps(index | change))
        with pytest.raises(RequestError, match="not the toy MMDiT"):
            load_mmdit_world(tmp_path / "model")
    index_file.write_text("{not json")
    with pytest.raises(RequestError, match="does not read"):
        load_mmdit_world(tmp_path / "model")


def test_bad_sampling_input_is_refused(pipe):
    for options, problem in (({"num_inference_steps": 0}, "at least 1"), ({"height": 8}, "16x16"),
                             ({"generator": [torch.Generator()] * 3}, "one generator per prompt")):
        with pytest.raises(ValueError, match=problem):
            pipe(["a red circle", "a blue star"], **options)
    with pytest.raises(ValueError, match="16x16"):  # through the adapter too: a size is never ignored
        ToyMMDiT().sample(pipe, ["a red circle"], [0], 2, 2.0, size=32)


def test_the_benchmark_runs_the_dit_rows_with_the_unet_worlds_own_settings():
    """bench/toyworld.py's DiT rows are ``ROWS`` entries (same per-concept settings and fusion), so
    the UNet world beside them runs the same method, not a row of a similar name."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("toyworld_bench", Path(__file__).parents[1] / "bench" / "toyworld.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = [(per_concept, fusion) for _, per_concept, fusion in bench.ROWS]
    assert bench.DIT_ROWS and all((per_concept, fusion) in settings for _, per_concept, fusion in bench.DIT_ROWS)


def test_the_sampler_integrates_the_velocity_training_teaches(pipe, monkeypatch):
    """Training teaches v = noise - x0 at x_t = (1 - s) x0 + s noise, timestep s x 1000; a transformer
    that predicts exactly that velocity toward a fixed image must be sampled onto that image, with
    guidance or without (the conditional and unconditional halves agree here)."""
    target = torch.rand(1, 3, 16, 16) * 2 - 1

    def exact_velocity(x, timestep, states, pooled):
        sigma = (timestep.float() / 1000).clamp_min(1e-6)
        return (x - target) / sigma

    monkeypatch.setattr(pipe, "predict", exact_velocity)
    for guidance in (1.0, 2.0):
        drawn = pipe("a red circle", num_inference_steps=5, guidance_scale=guidance, generator=torch.Generator().manual_seed(0)).images
        assert torch.allclose(drawn, (target + 1) / 2, atol=1e-4), guidance


def test_its_accuracy_is_measured_by_the_toy_worlds_command(pipe, tmp_path):
    import json

    from typer.testing import CliRunner

    from cli.main import app

    save_mmdit_pipeline(pipe, tmp_path / "model")
    done = CliRunner().invoke(app, ["toyworld", "accuracy", "--world", "mmdit", "--model", str(tmp_path / "model"),
                                    "--per-concept", "1", "--guidance", "2.0", "--json", str(tmp_path / "accuracy.json")])
    assert done.exit_code == 0, done.output
    table = json.loads((tmp_path / "accuracy.json").read_text())["2.0"]
    assert set(table["names"]) >= {"circle", "red", "striped"} and all(0 <= v <= 1 for v in table["names"].values())


def test_the_committed_model_loads_as_shipped():
    """The package's own MMDiT (what the benchmark measures) loads from the installed assets, finite,
    with the sampler settings its TRAINING.md measured."""
    model = load_mmdit_world()
    assert model.sampler_defaults() == (25, 4.0)
    assert sum(p.numel() for p in model.pipe.transformer.parameters()) < 25e6 / 4  # under 25 MB in float32
