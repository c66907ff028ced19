"""Every model family through its adapter, on tiny random pipelines built from configs: erase,
save, load through the family's own diffusers pipeline class, sample; retained prompts keep
their conditioning; restore is exact; the fingerprint covers every component; the edit
exports as a LoRA that diffusers loads and unloads."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli.main import app
from erasure.architectures.base import module_at, read_weight
from erasure.architectures.lora_export import REPORT_FILE, export_lora, low_rank_factors
from erasure.architectures.registry import architecture_of, load_pipeline
from erasure.architectures.tiny import FAMILIES, build_tiny_pipeline
from erasure.diffusion.models import pipeline_fingerprint
from erasure.loading import load_components
from erasure.methods.pipeline_edit import PipelineEraser, stream_alignments
from erasure.spec import ConceptSpec, FusionSettings, RequestError

CAT = ConceptSpec(name="cat", anchor="bird")
CAR = ConceptSpec(name="car", anchor="truck")
RETAINED = ["a photo of a dog"]
EXACT = FusionSettings(method="constrained", threshold=1e-9)  # the retained span's exact complement


def eraser(pipe, fusion=EXACT, concepts=(CAT,)) -> PipelineEraser:
    erasing = PipelineEraser(pipe, architecture_of(pipe), ["", *RETAINED], fusion=fusion, prompts_per_concept=2)
    for concept in concepts:
        erasing.add(concept)
    return erasing


def map_outputs(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per stream, what its first edited map gives the prompts' states (the denoiser's conditioning)."""
    architecture = architecture_of(pipe)
    states = architecture.states(pipe, prompts)
    out = {}
    for stream in architecture.streams(pipe):
        out[stream.name] = states[stream.name] @ read_weight(architecture.denoiser(pipe), stream.maps[0]).T
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def test_the_states_erased_are_what_the_maps_read_while_the_pipeline_samples(family):
    """Hooks on each stream's first map during a real pipeline call: its inputs (conditional and
    unconditional) are the adapter's states, so a diffusers change in what the maps read fails here."""
    pipe = build_tiny_pipeline(family)
    architecture = architecture_of(pipe)
    seen = {}

    def recorder(stream):
        def hook(module, args):
            read = args[0].detach().float()
            if stream.maps[0].columns is not None:
                read = read[..., stream.maps[0].columns[0] : stream.maps[0].columns[1]]
            seen.setdefault(stream.name, read.reshape(read.shape[0], -1, read.shape[-1]))
        return hook

    streams = architecture.streams(pipe)
    hooks = [module_at(architecture.denoiser(pipe), s.maps[0].module).register_forward_pre_hook(recorder(s)) for s in streams]
    architecture.sample(pipe, ["a photo of a Cat"], [0], 1, 3.0, size=16)
    for hook in hooks:
        hook.remove()
    conditional = architecture.states(pipe, ["a photo of a Cat"])
    unconditional = architecture.unconditional_states(pipe)
    assert set(seen) == {s.name for s in streams}
    for name, read in seen.items():
        assert any(torch.allclose(row, conditional[name][0], atol=1e-5) for row in read), name
        if read.shape[0] == 2:  # guided: the unconditional half is read too
            assert any(torch.allclose(row, unconditional[name], atol=1e-5) for row in read), name


def test_each_family_loads_as_its_own_pipeline_class(family):
    pipe = build_tiny_pipeline(family)
    assert architecture_of(pipe).family == family
    assert type(pipe).__name__ in architecture_of(pipe).pipeline_classes


def test_retained_prompts_keep_their_conditioning_and_the_concept_moves_to_its_anchor(family):
    pipe = build_tiny_pipeline(family)
    erased = eraser(pipe).erased_pipeline()
    before = map_outputs(pipe, ["a photo of a cat", "a photo of a bird", *RETAINED])
    after = map_outputs(erased, ["a photo of a cat", *RETAINED])
    for stream, base in before.items():
        retained_change = (after[stream][1:] - base[2:]).abs().max() / base[2:].abs().max()
        assert retained_change < 1e-5, (stream, float(retained_change))
    tokens_before = (before["tokens"][0] - before["tokens"][1]).norm()
    tokens_after = (after["tokens"][0] - before["tokens"][1]).norm()
    assert tokens_after < 0.95 * tokens_before  # the concept prompt's conditioning went toward the anchor's


def test_retained_prompt_draws_what_the_base_model_draws(family):
    pipe = build_tiny_pipeline(family)
    architecture = architecture_of(pipe)
    erased = eraser(pipe).erased_pipeline()
    base_images = architecture.sample(pipe, [RETAINED[0], "a photo of a cat"], [3, 3], 2, 3.0, size=16)
    erased_images = architecture.sample(erased, [RETAINED[0], "a photo of a cat"], [3, 3], 2, 3.0, size=16)
    assert (base_images[0] - erased_images[0]).abs().max() < 1e-4
    assert (base_images[1] - erased_images[1]).abs().max() > 1e-4  # the concept's image changed


def test_erased_pipeline_saves_and_loads_through_the_diffusers_class(family, tmp_path):
    pipe = build_tiny_pipeline(family)
    erasing = eraser(pipe)
    erased = erasing.erased_pipeline()
    architecture = architecture_of(pipe)
    assert architecture.denoiser(erased) is not architecture.denoiser(pipe) and erased.vae is pipe.vae  # only the denoiser is copied
    for stream in architecture.streams(pipe):  # and the base pipeline keeps its weights
        assert all(torch.equal(read_weight(architecture.denoiser(pipe), m), erasing.base[stream.name][m.module]) for m in stream.maps)
    assert dict(erased.config) == dict(pipe.config)  # SDXL's force_zeros_for_empty_prompt and the like carried over
    erased.save_pretrained(tmp_path / "erased")
    pipeline_class = getattr(diffusers, architecture_of(pipe).pipeline_classes[0])
    loaded = pipeline_class.from_pretrained(tmp_path / "erased", local_files_only=True)
    assert pipeline_fingerprint(loaded) == pipeline_fingerprint(erased) != pipeline_fingerprint(pipe)
    images = architecture_of(loaded).sample(loaded, ["a photo of a cat"], [0], 2, 3.0, size=16)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    again, architecture = load_pipeline(tmp_path / "erased")
    assert architecture.family == family and pipeline_fingerprint(again) == pipeline_fingerprint(erased)


def test_restore_is_exact(family):
    pipe = build_tiny_pipeline(family)
    both = eraser(pipe, FusionSettings(method="mace"), (CAT, CAR))
    only_cat = eraser(pipe, FusionSettings(method="mace"), (CAT,)).weights()
    both.remove("car")
    restored = both.weights()
    for stream, maps in only_cat.items():
        for module, weight in maps.items():
            assert torch.allclose(restored[stream][module], weight, atol=1e-6, rtol=0), module
    both.remove("cat")
    for stream, maps in both.weights().items():
        for module, weight in maps.items():
            assert torch.equal(weight, both.base[stream][module])  # nothing erased: the base itself


def test_fingerprint_covers_every_component(family):
    pipe = build_tiny_pipeline(family)
    reference = pipeline_fingerprint(pipe)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            parameter = next(component.parameters())
            with torch.no_grad():
                parameter.view(-1)[0] += 1.0
            assert pipeline_fingerprint(pipe) != reference, name
            with torch.no_grad():
                parameter.view(-1)[0] -= 1.0
        elif hasattr(component, "get_vocab"):
            length = component.model_max_length
            component.model_max_length = length + 1
            assert pipeline_fingerprint(pipe) != reference, name
            component.model_max_length = length
        elif component is not None:
            pipe.components[name].register_to_config(num_train_timesteps=999)
            assert pipeline_fingerprint(pipe) != reference, name
    assert pipeline_fingerprint(build_tiny_pipeline(family, seed=1)) != pipeline_fingerprint(build_tiny_pipeline(family))


def test_sd3_aligns_clip_and_t5_segments_each_with_its_own_tokenizer():
    pipe = build_tiny_pipeline("sd3")
    tokens = architecture_of(pipe).streams(pipe)[0]
    clip_length = tokens.segments[0].length
    (alignment,) = stream_alignments(pipe, tokens, [("a photo of a cat", "a photo of a bird")], "span", architecture_of(pipe))
    # CLIP: <start> a photo of a | cat | <end> ...; T5 (no start token): a photo of a | cat | </s> ...
    assert alignment.concept_span == (5, clip_length + 4)
    assert (5, 5) in alignment.pairs and (clip_length + 4, clip_length + 4) in alignment.pairs
    assert all(q < 2 * clip_length for _, q in alignment.pairs)


def test_pooled_stream_maps_the_concept_prompt_to_the_anchor_prompt():
    pipe = build_tiny_pipeline("sdxl")
    pooled = architecture_of(pipe).streams(pipe)[1]
    assert pooled.pooled and pooled.maps[0].columns == (0, pipe.text_encoder_2.config.projection_dim)
    assert [a.pairs for a in stream_alignments(pipe, pooled, [("a cat", "a bird")] * 2, "span", architecture_of(pipe))] == [((0, 0),)] * 2


def test_sdxl_unconditional_input_is_zeros_and_stays_zeros():
    pipe = build_tiny_pipeline("sdxl")
    assert pipe.config.force_zeros_for_empty_prompt
    assert all(not states.any() for states in architecture_of(pipe).unconditional_states(pipe).values())


def test_refusals_say_what_to_do(tmp_path):
    pipe = build_tiny_pipeline("flux")
    with pytest.raises(RequestError, match="closed form: use mace or constrained"):
        PipelineEraser(pipe, architecture_of(pipe), ["", *RETAINED], fusion=FusionSettings(method="separable"))
    with pytest.raises(RequestError, match="use fusion.projections: kv"):
        PipelineEraser(pipe, architecture_of(pipe), [""], fusion=FusionSettings(projections="v"))
    erasing = eraser(pipe)
    with pytest.raises(RequestError, match="already erased"):
        erasing.add(CAT)
    with pytest.raises(RequestError, match="not erased here; erased: cat"):
        erasing.remove("dog")
    one_shot = PipelineEraser(pipe, architecture_of(pipe), [""], prompts_per_concept=2, restorable=False)
    one_shot.add(CAT)
    with pytest.raises(RequestError, match="restorable=False"):
        one_shot.remove("cat")
    with pytest.raises(RequestError, match="no model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(RequestError, match="not supported"):
        architecture_of(object())


def test_an_eraser_without_restore_holds_the_same_bytes_for_one_concept_or_three():
    pipe = build_tiny_pipeline("flux")
    erasing = PipelineEraser(pipe, architecture_of(pipe), [""], fusion=FusionSettings(method="mace"), prompts_per_concept=2,
                             restorable=False)
    erasing.add(CAT)
    held = erasing.held_bytes()
    erasing.add(CAR)
    erasing.add(ConceptSpec(name="horse", anchor="dog"))
    assert erasing.held_bytes() == held
    restorable = eraser(pipe, FusionSettings(method="mace"), (CAT, CAR))
    assert restorable.held_bytes() > held  # each concept's own statistics, for remove


# --------------------------------------------------------------------------- LoRA export


def test_low_rank_factors_keep_the_asked_energy():
    torch.manual_seed(0)
    delta = torch.randn(20, 3) @ torch.randn(3, 30) + 1e-3 * torch.randn(20, 30)
    up, down, error = low_rank_factors(delta, 0.999)
    assert down.shape == (3, 30) and up.shape == (20, 3)
    assert error == pytest.approx(float((delta - up @ down).norm() / delta.norm()), rel=1e-4) and error < 0.01
    up, down, error = low_rank_factors(delta, 1.0)
    assert down.shape[0] == 20 and error < 1e-5
    with pytest.raises(RequestError, match="share of the edit"):
        low_rank_factors(delta, 0.0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "pixart"])
def test_lora_export_loads_into_the_served_pipeline_and_unloads(family, tmp_path):
    pipe = build_tiny_pipeline(family)
    architecture = architecture_of(pipe)
    erased = eraser(pipe, FusionSettings(method="mace"), (CAT, CAR)).erased_pipeline()
    report = export_lora(pipe, erased, architecture, tmp_path / "lora", energy=0.9999)
    summary = json.loads((tmp_path / "lora" / REPORT_FILE).read_text())
    assert summary["family"] == family and len(summary["maps"]) == len(report) > 0
    assert summary["max_relative_error"] == max(m.relative_error for m in report) < 0.02
    prompts, seeds = ["a photo of a cat"], [1]
    wanted = architecture.sample(erased, prompts, seeds, 2, 3.0, size=16)
    base = architecture.sample(pipe, prompts, seeds, 2, 3.0, size=16)
    pipe.load_lora_weights(tmp_path / "lora")
    with_lora = architecture.sample(pipe, prompts, seeds, 2, 3.0, size=16)
    assert (with_lora - wanted).abs().max() < 0.1 * (wanted - base).abs().max()
    pipe.unload_lora_weights()
    assert torch.equal(architecture.sample(pipe, prompts, seeds, 2, 3.0, size=16), base)
    with pytest.raises(RequestError, match="exists"):
        export_lora(pipe, erased, architecture, tmp_path / "lora")


def test_lora_export_refuses_what_it_cannot_ship(tmp_path):
    pipe = build_tiny_pipeline("pixart")
    with pytest.raises(RequestError, match="no load_lora_weights"):
        export_lora(pipe, pipe, architecture_of(pipe), tmp_path / "lora")
    flux = build_tiny_pipeline("flux")
    with pytest.raises(RequestError, match="no edit to export"):
        export_lora(flux, flux, architecture_of(flux), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


# --------------------------------------------------------------------------- the command line


def closed_form_request(model: Path) -> dict:
    return {
        "model": str(model),
        "concepts": [{"name": "cat", "anchor": "bird"}, {"name": "car", "anchor": "truck"}],
        "preserve": {"concepts": ["dog"]},
        "method": {"lora_steps": 0, "prompts_per_concept": 2},
        "fusion": {"method": "mace"},
    }


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_erase_generate_and_export_lora_from_the_command_line(family, tmp_path):
    base = build_tiny_pipeline(family)
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(closed_form_request(tmp_path / "base")))
    out = tmp_path / "erased"
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "erased 2 concept(s) from" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["family"] == family and manifest["base_fingerprint"] == pipeline_fingerprint(base)
    for row in manifest["concepts"]:  # the concept's conditioning went toward its anchor's, in the token stream
        assert row["to_anchor_after"]["tokens"] < row["to_anchor_before"]["tokens"]
        assert set(row["retained_drift"]) == set(row["to_anchor_before"]) == {"tokens", "pooled"}
    erased, architecture = load_pipeline(out / "model")
    assert architecture.family == family and pipeline_fingerprint(erased) != manifest["base_fingerprint"]

    result = CliRunner().invoke(app, ["generate", str(out / "model"), "a photo of a cat", "--out", str(tmp_path / "png"),
                                      "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "png" / "000.png").is_file()

    result = CliRunner().invoke(app, ["export-lora", str(tmp_path / "base"), str(out), "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    served = type(base).from_pretrained(tmp_path / "base", local_files_only=True)
    served.load_lora_weights(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / REPORT_FILE).read_text())["family"] == family


def test_the_command_line_refuses_what_the_closed_form_path_does_not_do(tmp_path):
    build_tiny_pipeline("flux").save_pretrained(tmp_path / "base")
    request = closed_form_request(tmp_path / "base") | {"method": {"prompts_per_concept": 2}}  # LoRA steps left on
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(request))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(tmp_path / "erased")])
    assert result.exit_code == 2 and "method.lora_steps: 0" in result.output
    assert not (tmp_path / "erased").exists()
    with pytest.raises(RequestError, match="FluxPipeline folder: `erasure erase`"):
        load_components(str(tmp_path / "base"))  # what run, takedown, restore, audit and evaluate load
    build_tiny_pipeline("sd").save_pretrained(tmp_path / "sd")
    result = CliRunner().invoke(app, ["export-lora", str(tmp_path / "sd"), str(tmp_path / "base"), "--out", str(tmp_path / "l")])
    assert result.exit_code == 2 and "is sd but" in result.output


def test_export_lora_of_a_unet_path_erasure(tmp_path, tiny_folder):
    """An SD 1.x output of `erasure erase` (its manifest fingerprints the base the UNet path's way)."""
    request = {"model": str(tiny_folder), "concepts": [{"name": "cat", "anchor": "bird"}],
               "method": {"lora_steps": 0, "prompts_per_concept": 2}, "fusion": {"method": "mace"}}
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(request))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(tmp_path / "erased")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["export-lora", str(tiny_folder), str(tmp_path / "erased"), "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    other = tmp_path / "other"
    build_tiny_pipeline("sd", seed=5).save_pretrained(other)
    result = CliRunner().invoke(app, ["export-lora", str(other), str(tmp_path / "erased"), "--out", str(tmp_path / "lora2")])
    assert result.exit_code == 2 and "erased from another model" in result.output


def test_pixart_aligns_the_text_its_pipeline_tokenizes():
    """PixArt lower-cases every prompt before T5 reads it: a capitalised concept is aligned as it is read."""
    pipe = build_tiny_pipeline("pixart")
    architecture = architecture_of(pipe)
    tokens = architecture.streams(pipe)[0]
    (alignment,) = stream_alignments(pipe, tokens, [("a photo of a Cat", "a photo of a Bird")], "span", architecture)
    assert alignment.concept_span == (4,)  # T5 has no start token: a photo of a | cat


def test_erase_loads_a_family_folder_in_the_dtype_asked(tmp_path, tiny_folder):
    build_tiny_pipeline("flux").save_pretrained(tmp_path / "base")
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(closed_form_request(tmp_path / "base")))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(tmp_path / "erased"),
                                      "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "erased" / "manifest.json").read_text())["dtype"] == "bfloat16"
    erased, _ = load_pipeline(tmp_path / "erased" / "model", "bfloat16")
    assert erased.transformer.context_embedder.weight.dtype == torch.bfloat16
    with pytest.raises(RequestError, match="not one of float32, bfloat16, float16"):
        load_pipeline(tmp_path / "base", "int8")
    (tmp_path / "sd.yaml").write_text(yaml.safe_dump(closed_form_request(tiny_folder)))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "sd.yaml"), "--out", str(tmp_path / "sd"), "--dtype", "float16"])
    assert result.exit_code == 2 and "--dtype applies to SDXL" in result.output


def test_the_adapter_path_on_sd_gives_the_unet_paths_closed_form(tmp_path):
    """Same science, two stage sequences: on an SD pipeline, the adapter's eraser and the UNet path
    (``erasure.erase.run_stages`` with ``lora_steps: 0``) solve to the same weights."""
    from erasure.diffusion.models import Components
    from erasure.erase import concept_seed, prior_prompts, run_stages
    from erasure.spec import parse_request

    pipe = build_tiny_pipeline("sd")
    components = Components(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, pipe.vae)
    request = parse_request({
        "model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "bird"}, {"name": "car", "anchor": "truck"}],
        "preserve": {"concepts": ["dog"]}, "method": {"lora_steps": 0, "prompts_per_concept": 3},
        "fusion": {"method": "mace"},
    })
    unet_path = run_stages(components, request).weights
    erasing = PipelineEraser(pipe, architecture_of(pipe), prior_prompts(request.preserve), request.preserve,
                             request.fusion, 3, request.method.edit_tokens)
    for concept in request.concepts:
        erasing.add(concept, concept_seed(request.seed, concept))
    adapter_path = erasing.weights()["tokens"]
    assert set(adapter_path) == set(unet_path)
    for name, weight in unet_path.items():
        assert torch.allclose(adapter_path[name], weight, atol=1e-5, rtol=1e-4), name


def test_export_lora_refuses_an_erased_model_of_another_base(tmp_path):
    base, other = build_tiny_pipeline("flux"), build_tiny_pipeline("flux", seed=3)
    erased = eraser(other, FusionSettings(method="mace")).erased_pipeline()
    with pytest.raises(RequestError, match="not made from this base"):
        export_lora(base, erased, architecture_of(base), tmp_path / "lora")
    xl = build_tiny_pipeline("sdxl")
    erased_xl = eraser(xl, FusionSettings(method="mace")).erased_pipeline()
    with torch.no_grad():  # the size-conditioning columns of add_embedding are not the erasure's to change
        erased_xl.unet.add_embedding.linear_1.weight[:, -1] += 1.0
    with pytest.raises(RequestError, match="add_embedding.linear_1"):
        export_lora(xl, erased_xl, architecture_of(xl), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_erase_refuses_concepts_the_tokenizers_cannot_read_and_broken_weights(tmp_path):
    pipe = build_tiny_pipeline("flux")
    pipe.save_pretrained(tmp_path / "base")
    request = closed_form_request(tmp_path / "base") | {"concepts": [{"name": "zzqx", "anchor": "bird"}]}
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(request))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(tmp_path / "erased")])
    assert result.exit_code == 2 and "'zzqx' tokenises to nothing" in result.output
    with torch.no_grad():
        pipe.text_encoder_2.shared.weight[0, 0] = float("nan")
    pipe.save_pretrained(tmp_path / "broken")
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(closed_form_request(tmp_path / "broken")))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "broken.yaml"), "--out", str(tmp_path / "erased")])
    assert result.exit_code == 2 and "text_encoder_2 holds NaN" in result.output
    assert not (tmp_path / "erased").exists()


def test_prompts_truncated_before_the_concept_are_left_out():
    pipe = build_tiny_pipeline("flux")  # T5 and CLIP both padded to 16 tokens
    late = "a photo of a dog and a tree and a house and a car and a chair and a cup and a cat"
    concept = ConceptSpec(name="cat", anchor="bird", prompts=(late,))
    erasing = PipelineEraser(pipe, architecture_of(pipe), [""], fusion=FusionSettings(method="mace"), prompts_per_concept=2)
    assert len(erasing.add(concept).pairs) == 2  # the two templated pairs; the user prompt's cat is past token 16
    only_late = PipelineEraser(pipe, architecture_of(pipe), [""], fusion=FusionSettings(method="mace"), prompts_per_concept=0)
    with pytest.raises(RequestError, match="no prompt kept the concept.s tokens apart from its anchor.s .truncated"):
        only_late.add(concept)


def test_a_bfloat16_erasure_exports_against_its_float32_base(tmp_path):
    """The erasure's manifest says the dtype it was made in: export-lora loads both models in it."""
    build_tiny_pipeline("sdxl").save_pretrained(tmp_path / "base")
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(closed_form_request(tmp_path / "base")))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(tmp_path / "erased"),
                                      "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    for given in (tmp_path / "erased", tmp_path / "erased" / "model"):
        out = tmp_path / f"lora-{given.name}"
        result = CliRunner().invoke(app, ["export-lora", str(tmp_path / "base"), str(given), "--out", str(out)])
        assert result.exit_code == 0, result.output
    base = build_tiny_pipeline("sdxl")
    erased, _ = load_pipeline(tmp_path / "erased" / "model")  # float32, as saved in bfloat16
    export_lora(base, erased, architecture_of(base), tmp_path / "direct")  # no manifest: the coarser dtype decides


def test_states_that_overflow_are_refused_and_a_failed_add_changes_nothing():
    pipe = build_tiny_pipeline("flux")
    erasing = PipelineEraser(pipe, architecture_of(pipe), [""], fusion=FusionSettings(method="mace"), prompts_per_concept=2)
    erasing.add(CAT)
    before = erasing.weights()
    with torch.no_grad():
        pipe.text_encoder_2.shared.weight.mul_(float("inf"))  # as float16 does to T5's activations
    with pytest.raises(RequestError, match="load the model in bfloat16 or float32"):
        erasing.add(CAR)
    assert list(erasing.concepts) == ["cat"]
    after = erasing.weights()
    assert all(torch.equal(after[s][m], w) for s, maps in before.items() for m, w in maps.items())


def test_a_sentencepiece_word_start_alone_is_no_token_of_the_concept():
    """T5's SentencePiece writes an unknown word as the word-start marker and <unk>: nothing to erase."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from erasure.spec import check_concepts_against_tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), ("▁cat", -2.0), ("c", -3.0), ("a", -3.0), ("t", -3.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    assert tokenizer.convert_ids_to_tokens(tokenizer("zzqx", add_special_tokens=False)["input_ids"]) == ["▁", "<unk>"]
    check_concepts_against_tokenizer([CAT], tokenizer)
    with pytest.raises(RequestError, match="'zzqx' tokenises to nothing"):
        check_concepts_against_tokenizer([ConceptSpec(name="zzqx", anchor="bird")], tokenizer)


def test_fusion_projections_v_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))  # nothing else: no load
    request = closed_form_request(tmp_path / "base") | {"fusion": {"method": "mace", "projections": "v"}}
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(request))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(tmp_path / "erased")])
    assert result.exit_code == 2 and "fusion.projections: kv" in result.output


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding a tiny SDXL as `org/tiny-sdxl` at a pinned revision (offline, as in CI)."""
    import huggingface_hub.constants

    revision = "a" * 40
    repository = tmp_path / "hub" / "models--org--tiny-sdxl"
    build_tiny_pipeline("sdxl").save_pretrained(repository / "snapshots" / revision)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("ERASURE_ALLOWED_MODELS", f"org/tiny-sdxl@{revision}")
    return "org/tiny-sdxl"


def test_a_hub_id_of_a_family_erases_generates_and_exports_from_the_pinned_snapshot(hub_cache, tmp_path, monkeypatch):
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(closed_form_request(hub_cache) | {"model": hub_cache}))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(tmp_path / "erased")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "erased" / "manifest.json").read_text())["family"] == "sdxl"
    result = CliRunner().invoke(app, ["generate", hub_cache, "a photo of a cat", "--out", str(tmp_path / "png"), "--steps", "2"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["export-lora", hub_cache, str(tmp_path / "erased"), "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("ERASURE_ALLOWED_MODELS", "org/other@" + "b" * 40)  # not on the worker's list: refused before any work
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(tmp_path / "again")])
    assert result.exit_code == 2 and "not on this worker's allow-list" in result.output
