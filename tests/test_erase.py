import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from typer.testing import CliRunner

import erasure.erase as erase_module
from cli.main import app
from erasure.core.attention import cross_attention_projections
from erasure.diffusion.models import build_tiny_components, fingerprint
from erasure.loading import load_components
from erasure.spec import RequestError, parse_request

# the tiny model's random 32-wide text encoder leaves the constrained fusion (the default) no null
# space to edit in: pipeline tests on it use MACE's fusion; the methods are tested on the toy world
TINY_FUSION = {"method": "mace"}

REQUEST = {
    "model": "builtin:tiny",
    "fusion": TINY_FUSION,
    "concepts": [
        {"name": "cat", "anchor": "dog", "synonyms": ["kitty"]},
        {"name": "van gogh", "kind": "style"},
        {"name": "nude", "kind": "explicit"},
    ],
    "preserve": {"concepts": ["tree", "house"]},
    "method": {"images_per_concept": 2, "sampler_steps": 3, "lora_steps": 4, "prompts_per_concept": 8},
    "seed": 3,
}


def test_tiny_model_is_deterministic_and_fingerprint_survives_save_and_load(tiny, tiny_folder):
    assert fingerprint(build_tiny_components()) == fingerprint(tiny)
    assert fingerprint(build_tiny_components(seed=1)) != fingerprint(tiny)
    assert fingerprint(load_components(str(tiny_folder))) == fingerprint(tiny)


def test_hub_id_offline_says_how_to_use_a_local_folder():
    with pytest.raises(RequestError, match="--local-dir DIR"):
        load_components("someone/some-model-that-is-not-cached")


def test_hub_models_must_be_on_the_workers_allow_list_at_a_pinned_revision(monkeypatch):
    from erasure.diffusion.models import allowed_revision

    monkeypatch.delenv("ERASURE_ALLOWED_MODELS", raising=False)
    assert allowed_revision("org/any") is None  # no list: a laptop loads what it is given
    monkeypatch.setenv("ERASURE_ALLOWED_MODELS", "CompVis/stable-diffusion-v1-4@133a221b, org/unpinned")
    assert allowed_revision("CompVis/stable-diffusion-v1-4") == "133a221b"
    with pytest.raises(RequestError, match="not on this worker's allow-list"):
        load_components("evil/model")
    with pytest.raises(RequestError, match="without a pinned revision"):
        load_components("org/unpinned")


def test_erase_cli_writes_a_model_that_loads_and_generates(tmp_path, tiny):
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(REQUEST))
    out = tmp_path / "erased"
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "erased 3 concept(s)" in result.output

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_fingerprint"] == fingerprint(tiny)
    assert [c["name"] for c in manifest["concepts"]] == ["cat", "van gogh", "nude"]
    assert manifest["concepts"][1]["mask_coverage"] == 1.0  # styles use the whole image
    assert 0 < manifest["concepts"][0]["mask_coverage"] < 1  # objects use attention masks
    assert manifest["request"]["preserve"]["concepts"] == ["tree", "house"]
    for name in ("cat", "van gogh", "nude"):
        folder = out / "concepts" / erase_module.slug(name)
        assert (folder / "pytorch_lora_weights.safetensors").is_file()
        assert len(list((folder / "data").glob("mask_*.png"))) == 2

    # the erased UNet loads on its own and inside a standard pipeline, and differs from the base
    unet = UNet2DConditionModel.from_pretrained(out / "model", subfolder="unet")
    changed = [
        name for name, p in cross_attention_projections(unet).items()
        if not torch.equal(p.weight, cross_attention_projections(tiny.unet)[name].weight)
    ]
    assert changed
    pipe = StableDiffusionPipeline.from_pretrained(out / "model", local_files_only=True)
    image = pipe("a photo of the cat", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()

    samples = tmp_path / "samples"
    result = CliRunner().invoke(
        app, ["generate", str(out / "model"), "a photo of the cat", "a tree", "--out", str(samples), "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in samples.iterdir()) == ["000.png", "001.png"]

    # an existing output folder is never overwritten silently
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output


def test_a_crash_while_writing_leaves_no_output(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(erase_module, "save_concept", broken)
    request = parse_request(REQUEST | {"concepts": REQUEST["concepts"][:1]})
    with pytest.raises(OSError, match="disk full"):
        erase_module.erase(request, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_erased_model_is_rebuilt_exactly_from_its_stored_artifacts(tmp_path, tiny):
    """Fusion needs only the stored per-concept artifacts and prior: what takedown and restore use."""
    from erasure.artifacts import PRIOR_FILE, load_concept, load_prior
    from erasure.methods.fusion import fuse, fused_weights, fusion_prior

    request = parse_request(REQUEST | {"concepts": REQUEST["concepts"][:2]})
    erase_module.erase(request, tmp_path / "out")
    concepts = [load_concept(tmp_path / "out" / "concepts" / erase_module.slug(name)) for name in ("cat", "van gogh")]
    assert [c.concept.name for c in concepts] == ["cat", "van gogh"]
    prior = fusion_prior(load_prior(tmp_path / "out" / PRIOR_FILE), concepts)
    rebuilt = fused_weights(tiny, concepts, prior, request.preserve, request.fusion)
    saved = cross_attention_projections(UNet2DConditionModel.from_pretrained(tmp_path / "out" / "model", subfolder="unet"))
    for name, weight in rebuilt.items():
        assert torch.allclose(weight, saved[name].weight, atol=1e-6), name

    # the workers' path: the artifacts read one at a time, as a generator, once; an artifact is
    # let go once added (the loop still names the last one while the next is read)
    import gc
    import weakref

    read, alive_before = [], []

    def one_at_a_time():
        for name in ("cat", "van gogh", "cat", "van gogh"):
            gc.collect()
            alive_before.append(sum(ref() is not None for ref in read))
            artifact = load_concept(tmp_path / "out" / "concepts" / erase_module.slug(name))
            read.append(weakref.ref(artifact))
            yield artifact

    streamed = fuse(tiny, one_at_a_time(), load_prior(tmp_path / "out" / PRIOR_FILE), request.preserve, request.fusion)
    assert len(read) == 4 and alive_before == [0, 1, 1, 1]  # never more than the one being added
    doubled = [*concepts, *concepts]
    twice = fused_weights(tiny, doubled, fusion_prior(load_prior(tmp_path / "out" / PRIOR_FILE), doubled), request.preserve, request.fusion)
    for name, weight in streamed.items():
        assert torch.allclose(weight, twice[name], atol=1e-6), name


def test_concept_folder_names_never_collide():
    names = ["van gogh", "van-gogh", "Van Gogh!", "梵高", "モネ", "x" * 300]
    slugs = [erase_module.slug(n) for n in names]
    assert len(set(slugs)) == len(slugs)  # "van gogh", "van-gogh", "Van Gogh!": same readable part, three folders
    assert slugs[3].startswith("concept-") and slugs[4].startswith("concept-")  # non-Latin names
    assert erase_module.slug("Van  Gogh") == erase_module.slug("van gogh")  # one concept, one folder
    assert all(len(s) <= 49 for s in slugs)


def test_fingerprint_covers_the_models_own_sampling_defaults(tiny):
    """Editing erasure_defaults.json changes every image drawn for erasure: cached artifacts must not be reused."""
    import dataclasses

    changed = dataclasses.replace(tiny, defaults={"guidance_scale": 2.0})
    assert fingerprint(changed) != fingerprint(tiny)
    # a model without its own settings is keyed by ours: changing our defaults changes its artifacts too
    import erasure.diffusion.models as models

    class OtherDefaults(models.SamplingSettings):
        sampler_steps: int = 31

    before = fingerprint(tiny)
    original = models.SamplingSettings
    models.SamplingSettings = OtherDefaults
    try:
        assert fingerprint(tiny) != before
    finally:
        models.SamplingSettings = original
    assert fingerprint(dataclasses.replace(tiny, defaults={"sampler_steps": 30, "guidance_scale": 7.5})) == before


@pytest.mark.parametrize("where", [".", "..", "/", "~"])
def test_out_refuses_the_current_folder_its_parents_home_and_root(tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("precious")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    (work / "request.yaml").write_text(yaml.safe_dump(REQUEST))
    result = CliRunner().invoke(app, ["erase", "request.yaml", "--out", where, "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "folder of its own" in " ".join(result.output.split())
    assert (work / "keep.txt").read_text() == "precious"


def test_overwrite_refuses_a_folder_that_is_not_an_erasure_output(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_text("not ours")
    request = parse_request(REQUEST | {"concepts": REQUEST["concepts"][:1]})
    with pytest.raises(RequestError, match="not a previous erasure output"):
        erase_module.erase(request, other, overwrite=True)
    assert (other / "holiday.jpg").read_text() == "not ours"


def test_overwrite_replaces_atomically_and_a_crash_keeps_the_previous_output(tmp_path, monkeypatch):
    request = parse_request(REQUEST | {"concepts": REQUEST["concepts"][:1], "method": REQUEST["method"] | {"lora_steps": 1}})
    out = tmp_path / "out"
    erase_module.erase(request, out)
    before = (out / "manifest.json").read_text()

    real_replace = erase_module.os.replace

    def crash_on_publish(source, target):
        if Path(target) == out and Path(source).name != "out":  # the new output's rename, not the roll-back
            raise OSError("killed while renaming")
        return real_replace(source, target)

    monkeypatch.setattr(erase_module.os, "replace", crash_on_publish)
    with pytest.raises(OSError, match="killed"):
        erase_module.erase(request, out, overwrite=True)
    monkeypatch.undo()
    assert (out / "manifest.json").read_text() == before  # the previous output is back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or aside folder left

    erase_module.erase(request, out, overwrite=True)  # and a real overwrite replaces it
    assert json.loads((out / "manifest.json").read_text())["base_fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_overwrite_an_output_written_meanwhile_is_never_replaced(tmp_path):
    out, staging = tmp_path / "out", tmp_path / ".out.staging"
    out.mkdir()
    (out / "manifest.json").write_text("another run's output")
    staging.mkdir()
    (staging / "manifest.json").write_text("ours")
    with pytest.raises(RequestError, match="written by another run meanwhile"):
        erase_module.publish_output(staging, out, overwrite=False)
    assert (out / "manifest.json").read_text() == "another run's output"


@pytest.mark.parametrize("encoder", ["bert", "t5"])
def test_erase_with_a_bidirectional_text_encoder_end_to_end(tmp_path, encoder):
    """Not only CLIP: a BERT-like or T5 encoder named by the folder loads, erases (a two-piece
    concept), saves and loads back, the encoder untouched and the UNet edited."""
    from erasure.diffusion.models import save_components
    from erasure.diffusion.sampling import sample

    base = build_tiny_components(text_encoder=encoder).eval()
    save_components(base, tmp_path / "base")
    index = json.loads((tmp_path / "base" / "model_index.json").read_text())
    assert index["text_encoder"][1] == {"bert": "BertModel", "t5": "T5EncoderModel"}[encoder]
    loaded = load_components(str(tmp_path / "base"))
    assert fingerprint(loaded) == fingerprint(base)

    request = parse_request(
        REQUEST | {"model": str(tmp_path / "base"), "concepts": [{"name": "kitty", "anchor": "dog"}],
                   "method": REQUEST["method"] | {"lora_steps": 2}},
    )
    erase_module.erase(request, tmp_path / "out")
    erased = load_components(str(tmp_path / "out" / "model"))
    assert type(erased.text_encoder) is type(base.text_encoder)
    for name, weight in base.text_encoder.state_dict().items():
        assert torch.equal(weight, erased.text_encoder.state_dict()[name]), name
    edited = [
        n for n, p in cross_attention_projections(erased.unet).items()
        if not torch.equal(p.weight, cross_attention_projections(base.unet)[n].weight)
    ]
    assert edited
    images, _ = sample(erased, ["a photo of the kitty"], [0], 2, 2.0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_the_tiny_models_example_request_runs_as_given(tmp_path):
    """examples/quickstart.yaml names builtin:tiny, whose 32-wide encoder leaves the default
    constrained fusion nothing to edit in: the example names the fusion that fits it."""
    example = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
    result = CliRunner().invoke(app, ["erase", str(example), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model" / "unet").is_dir()


def test_a_constrained_fusion_with_no_room_fails_after_the_prior_before_any_concept_work(tiny):
    """It used to fail at the fusion, after every concept's images and LoRA."""
    request = parse_request({k: v for k, v in REQUEST.items() if k != "fusion"})
    assert request.fusion.method == "constrained"
    calls = []
    with pytest.raises(RequestError, match="retained states use every direction of the text space.*fusion.method: mace"):
        erase_module.run_stages(tiny, request, progress=lambda *call: calls.append(call))
    assert calls == []  # not one concept started


def test_a_concept_with_a_reused_prior_leaving_no_room_fails_before_its_images(tiny, monkeypatch):
    """A prior published by a MACE run is reused by a constrained one: base_prior's check did not run."""
    request = parse_request({k: v for k, v in REQUEST.items() if k != "fusion"})
    prior = erase_module.prior_statistics(tiny, erase_module.prior_prompts(request.preserve))
    drawn = []
    monkeypatch.setattr(erase_module, "generate_concept_data", lambda *args: drawn.append(args))
    with pytest.raises(RequestError, match="retained states use every direction"):
        erase_module.erase_concept(tiny, request.concepts[0], request, prior)
    assert drawn == []


def _unet_config(folder):
    return json.loads((folder / "unet" / "config.json").read_text())


def _nan_unet(folder):
    from safetensors.torch import load_file, save_file

    path = next((folder / "unet").glob("*.safetensors"))
    tensors = load_file(path)
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, path)


MALFORMED_FOLDERS = {
    # a config asking for a UNet no weight file could hold: used to allocate 3.2 GB before failing
    "huge UNet": (lambda f: (f / "unet/config.json").write_text(json.dumps(_unet_config(f) | {"block_out_channels": [4096, 8192], "layers_per_block": 8})),
                  "describes 70,619,238,404 parameters, more than its weight files"),
    "NaN weights": (_nan_unet, "unet holds NaN or infinite weights"),  # used to load silently
    "no UNet config": (lambda f: (f / "unet/config.json").unlink(), "unet/config.json does not load"),
    "UNet config not JSON": (lambda f: (f / "unet/config.json").write_text("{oops"), "unet/config.json does not load"),
    "UNet config a list": (lambda f: (f / "unet/config.json").write_text("[1, 2]"), "must hold a JSON object"),
    "UNet config of the wrong type": (lambda f: (f / "unet/config.json").write_text(json.dumps(_unet_config(f) | {"block_out_channels": "abc"})),
                                      "unet/config.json does not load"),
    "truncated weights": (lambda f: next((f / "unet").glob("*.safetensors")).write_bytes(b"x" * 1000), "more than its weight files"),
    "weights of another shape": (lambda f: (f / "unet/config.json").write_text(json.dumps(_unet_config(f) | {"cross_attention_dim": 64})),
                                 "unet does not load"),
    "scheduler config not JSON": (lambda f: (f / "scheduler/scheduler_config.json").write_text("{"), "scheduler does not load"),
    "text encoder config not JSON": (lambda f: (f / "text_encoder/config.json").write_text("{"), "text_encoder does not load"),
    "defaults not JSON": (lambda f: (f / "erasure_defaults.json").write_text("{"), "erasure_defaults.json does not load"),
}


@pytest.mark.parametrize("case", list(MALFORMED_FOLDERS))
def test_a_malformed_model_folder_is_a_message_naming_the_part_never_a_traceback(tmp_path, tiny_folder, case):
    """Issue 22, finding 13: a huge config grew to 3.2 GB, all-NaN weights loaded silently, and
    malformed folders gave tracebacks."""
    import shutil

    from erasure.diffusion.models import load_folder
    from erasure.spec import RequestError

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    mutate, message = MALFORMED_FOLDERS[case]
    mutate(folder)
    with pytest.raises(RequestError, match=re.escape(message)):
        load_folder(folder)


KILLED_WHILE_WRITING = """
import json, os, signal, sys
import erasure.erase as erase_module
from erasure.spec import parse_request

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

erase_module.save_prior = killed
erase_module.erase(parse_request(json.loads(sys.argv[1])), sys.argv[2])
"""


def test_a_run_killed_while_writing_leaves_a_staging_folder_that_the_next_run_removes(tmp_path):
    """Issue 22, finding 14: a `kill -9` during the write phase left hidden `.out.xxxx` folders
    that nothing removed."""
    import subprocess
    import sys

    request = REQUEST | {"concepts": REQUEST["concepts"][:1]}
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, json.dumps(request), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.staging-"), left  # nothing published
    erase_module.erase(parse_request(request), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_writers_staging_folder_is_never_removed(tmp_path):
    from erasure.staging import make_staging, remove_stale_staging

    mine = make_staging(tmp_path, "out")
    assert remove_stale_staging(tmp_path, "out") == [] and mine.is_dir()
    other_host = tmp_path / ".out.staging-elsewhere.example-1-abc"
    other_host.mkdir()
    assert remove_stale_staging(tmp_path, "out") == [] and other_host.is_dir()  # its writer may still run
    os.utime(other_host, (0, 0))  # older than any write phase
    assert remove_stale_staging(tmp_path, "out") == [other_host]


def test_a_prior_loses_a_retained_concept_exactly_by_subtraction(tiny):
    """Issue 18, incremental prior: a takedown of a concept the prior kept subtracts its states;
    the result is the prior of the same prompts without that concept's, to float64 rounding."""
    from erasure.erase import prior_prompts, prior_statistics, retained_prompts, without_retained
    from erasure.spec import PreserveSpec

    preserve = PreserveSpec(concepts=("bird", "car", "monet"))
    full = prior_statistics(tiny, prior_prompts(preserve))
    less = without_retained(tiny, full, preserve.concepts, ("Car",))
    car = retained_prompts(preserve.concepts, ("car",))
    assert car and all("car" in prompt for prompt in car)
    rest = list(prior_prompts(preserve))
    for prompt in car:
        rest.remove(prompt)
    expected = prior_statistics(tiny, rest)
    assert less.count == expected.count
    assert torch.allclose(less.total, expected.total, atol=1e-9 * float(expected.total.abs().max()))
    with pytest.raises(ValueError, match="not retained in the prior: dog"):
        retained_prompts(preserve.concepts, ("dog",))


def test_a_closed_form_only_erasure_draws_no_image_and_still_edits(tmp_path, tiny, monkeypatch):
    """lora_steps 0 trains nothing, so nothing reads the base model's images: none are drawn (what
    makes a thousand-concept erasure cheap), and the CFR edit still lands."""
    def no_sampling(*args, **kwargs):
        raise AssertionError("a closed-form-only erasure sampled the base model")

    monkeypatch.setattr(erase_module, "generate_concept_data", no_sampling)
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(REQUEST | {"method": REQUEST["method"] | {"lora_steps": 0}}))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output  # its summary table has no mask coverage to show
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [c["mask_coverage"] for c in manifest["concepts"]] == [None, None, None]
    concept = tmp_path / "out" / "concepts" / erase_module.slug("cat")
    assert (concept / "pytorch_lora_weights.safetensors").is_file() and not list(concept.rglob("*.png"))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "model", subfolder="unet")
    base = cross_attention_projections(tiny.unet)
    assert any(not torch.equal(p.weight, base[n].weight) for n, p in cross_attention_projections(unet).items())


def test_closure_needs_images_so_refuses_lora_steps_0():
    with pytest.raises(RequestError, match="lora_steps: 0 draws none"):
        parse_request({"model": "builtin:toyworld", "concepts": [{"name": "red", "anchor": "white"}],
                       "method": {"lora_steps": 0}, "fusion": {"closure": {}}})
