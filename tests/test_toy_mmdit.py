"""The joint-attention toy world (``erasure.worlds.toyworld.mmdit``) on an untrained MMDiT: it saves
and loads, samples deterministically per seed, and the families' closed form erases it through its
adapter with retained conditioning exact and restore exact; its training resumes from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from erasure.architectures.base import LoadedPipeline, read_weight
from erasure.methods.pipeline_edit import PipelineEraser
from erasure.spec import ConceptSpec, FusionSettings
from erasure.worlds.toyworld.mmdit import ToyMMDiT, build_mmdit_pipeline, load_mmdit_world, save_mmdit_pipeline

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
    assert loaded.sampler_defaults() == (25, 2.0)
    together = loaded.sample(["a red circle", "a blue star"], [3, 4], 3, 2.0)
    alone = loaded.sample(["a blue star"], [4], 3, 2.0)
    assert together.shape == (2, 3, 16, 16) and 0 <= together.min() and together.max() <= 1
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
    assert (after["tokens"][0] - before["tokens"][1]).norm() < 0.95 * (before["tokens"][0] - before["tokens"][1]).norm()

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


def test_training_resumes_from_its_checkpoint_and_refuses_another_worlds(tmp_path):
    from erasure.worlds.toyworld.train_mmdit import train_mmdit

    lines = []
    _, first = train_mmdit(tmp_path / "run", steps=2, batch=4, checkpoint_every=1, warmup=1, log=lines.append)
    folder, rest = train_mmdit(tmp_path / "run", steps=3, batch=4, checkpoint_every=1, warmup=1, log=lines.append)
    assert "resumed from step 2" in lines and len(first) == 2 and len(rest) == 1
    assert all(torch.isfinite(torch.tensor(first + rest)))
    assert isinstance(load_mmdit_world(folder), LoadedPipeline)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    torch.save(state | {"world": "minilm"}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match="not 'mmdit'"):
        train_mmdit(tmp_path / "run", steps=4, batch=4, log=lines.append)
