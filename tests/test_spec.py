"""Every bad request fails with a message that says what to fix, and writes nothing."""

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from erasure.spec import RequestError, load_request, parse_request

GOOD = {"model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}]}


def with_(**changes):
    data = json.loads(json.dumps(GOOD))
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        (with_(colour="red"), "colour: unknown key"),
        (with_(concepts=[{"name": "cat", "anchor": "dog", "kinda": "x"}]), "concepts.0.kinda: unknown key"),
        (with_(concepts=[]), "concepts: list at least one concept"),
        (with_(concepts=[{"name": "Van  Gogh", "kind": "style"}, {"name": "van gogh", "kind": "style"}]), "duplicate concept"),
        (with_(concepts=[{"name": "cat", "anchor": "dog", "synonyms": ["kitty", "Kitty "]}]), "duplicate concept"),
        (with_(concepts=[{"name": "dog", "anchor": "Dog"}]), "equal to its anchor"),
        (with_(concepts=[{"name": "cat"}]), "needs an explicit 'anchor'"),
        (with_(concepts=[{"name": "cat", "anchor": "dog", "kind": "animal"}]), "concepts.0.kind"),
        (with_(preserve={"concepts": ["dog", "CAT"]}), "both erased and preserved"),
        (with_(preserve={"lam1": -1}), "preserve.lam1"),
        (with_(model="./no/such/folder"), "does not exist"),
        (with_(model="builtin:huge"), "unknown built-in"),
        (with_(preserve={"captions": "missing.txt"}), "preserve.captions"),
        (with_(method={"lora_steps": -1}), "method.lora_steps"),
        ([1, 2], "top level must be a mapping"),
        # bounds on every field, refused before anything is loaded
        (with_(concepts=[{"name": "c" * 201, "anchor": "dog"}]), "concepts.0.name: is 201 characters long"),
        (with_(concepts=[{"name": "cat\x00", "anchor": "dog"}]), "concepts.0.name: contains U+0000"),
        (with_(concepts=[{"name": "cat\u202e", "anchor": "dog"}]), "concepts.0.name: contains U+202E"),
        (with_(concepts=[{"name": "ca\u200bt", "anchor": "dog"}]), "concepts.0.name: contains U+200B"),
        (with_(concepts=[{"name": "cat", "anchor": "d\u200dog"}]), "concepts.0.anchor: contains U+200D"),
        (with_(concepts=[{"name": "cat", "anchor": "dog", "synonyms": ["ki\ttty"]}]), "concepts.0.synonyms.0: contains U+0009"),
        (with_(concepts=[{"name": "cat", "anchor": "dog", "prompts": ["p" * 1001]}]), "concepts.0.prompts.0"),
        (with_(concepts=[{"name": f"c{i}", "anchor": "dog"} for i in range(1001)]), "concepts: Tuple should have at most 1000"),
        (with_(preserve={"concepts": ["\ufefftree"]}), "preserve.concepts.0: contains U+FEFF"),
        (with_(method={"images_per_concept": 10_000}), "method.images_per_concept"),
        (with_(method={"sampler_steps": 10**6}), "method.sampler_steps"),
        (with_(method={"lora_steps": 10**9}), "method.lora_steps"),
        (with_(seed=-1), "seed: Input should be greater than or equal to 0"),
        (with_(seed=2**40), "seed: Input should be less than or equal to"),
        (with_(model="m" * 2000), "model: is 2000 characters long"),
    ],
)
def test_bad_requests_are_rejected_with_a_clear_message(tmp_path, data, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        parse_request(data, base_dir=tmp_path)


def test_empty_caption_file_is_rejected(tmp_path):
    (tmp_path / "captions.txt").write_text("\n  \n")
    with pytest.raises(RequestError, match="holds no caption"):
        parse_request(with_(preserve={"captions": "captions.txt"}), base_dir=tmp_path)


def test_default_anchors_by_kind_and_relative_paths(tmp_path):
    (tmp_path / "captions.txt").write_text("a cat on a mat\na dog\n")
    request = parse_request(
        with_(
            concepts=[{"name": "Someone Famous", "kind": "person"}, {"name": "monet", "kind": "style"},
                      {"name": "nudity", "kind": "explicit"}],
            preserve={"captions": "captions.txt"},
        ),
        base_dir=tmp_path,
    )
    assert [c.anchor for c in request.concepts] == ["a person", "art", "a person wearing clothes"]
    assert request.preserve.captions == (tmp_path / "captions.txt").resolve()
    assert request.method.images_per_concept == 8 and request.method.lora_rank == 1  # the paper's defaults


def test_yaml_and_json_files_load(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "r.json").write_text(json.dumps(GOOD))
    assert load_request(tmp_path / "r.yaml") == load_request(tmp_path / "r.json")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(RequestError, match="not valid YAML"):
        load_request(tmp_path / "bad.yaml")


def test_name_that_tokenises_to_nothing_is_rejected(tiny):
    request = parse_request(with_(concepts=[{"name": "<|endoftext|>", "anchor": "dog"}]))
    with pytest.raises(RequestError, match="tokenises to nothing"):
        request.check_against_tokenizer(tiny.tokenizer)


@pytest.mark.parametrize(
    "data, message",
    [
        (with_(concepts=[]), "list at least one concept"),
        (with_(concepts=[{"name": "<|endoftext|>", "anchor": "dog"}]), "tokenises to nothing"),
        (with_(model="./missing"), "does not exist"),
    ],
)
def test_cli_rejects_bad_requests_and_writes_nothing(tmp_path, data, message):
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "request.yaml"), "--out", str(out)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["request.yaml"]


def test_request_file_size_and_yaml_aliases_are_bounded(tmp_path):
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20) + "\n" + yaml.safe_dump(GOOD))
    with pytest.raises(RequestError, match="larger than 1024 KiB"):
        load_request(tmp_path / "big.yaml")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b]\n"
    (tmp_path / "bomb.yaml").write_text(bomb + yaml.safe_dump(GOOD))
    with pytest.raises(RequestError, match="aliases"):
        load_request(tmp_path / "bomb.yaml")


def test_caption_file_is_bounded_hashed_and_checked_when_read_again(tmp_path, monkeypatch):
    import erasure.spec as spec

    path = tmp_path / "captions.txt"
    path.write_text("a cat on a mat\na dog\n")
    request = parse_request(with_(preserve={"captions": "captions.txt"}), base_dir=tmp_path)
    captions, digest = spec.read_captions(path)
    assert captions == ["a cat on a mat", "a dog"] and request.preserve.captions_sha256 == digest

    path.write_text("a cat on a mat\na dog\na tree\n")  # changed after validation
    with pytest.raises(RequestError, match="changed since the request was validated"):
        spec.read_captions(path, request.preserve.captions_sha256)

    monkeypatch.setattr(spec, "MAX_CAPTION_BYTES", 16)
    with pytest.raises(RequestError, match="larger than"):
        parse_request(with_(preserve={"captions": "captions.txt"}), base_dir=tmp_path)
    monkeypatch.undo()
    path.write_bytes(b"a cat\n\xff\xfe\n")
    with pytest.raises(RequestError, match="not UTF-8"):
        parse_request(with_(preserve={"captions": "captions.txt"}), base_dir=tmp_path)
    path.write_text("a cat\nhidden\u202etext\n")
    with pytest.raises(RequestError, match="caption 2: contains U\\+202E"):
        parse_request(with_(preserve={"captions": "captions.txt"}), base_dir=tmp_path)


def test_builtin_models_come_from_one_registry():
    from erasure.evaluation.evaluate import has_judge
    from erasure.spec import builtin_names

    assert builtin_names() == ["builtin:tiny", "builtin:toyworld", "builtin:toyworld-clip", "builtin:identities"]
    assert has_judge("builtin:toyworld") and has_judge("builtin:toyworld-clip") and has_judge("builtin:identities")
    assert not has_judge("builtin:tiny") and not has_judge("/some/folder")
    with pytest.raises(RequestError, match="valid: builtin:tiny, builtin:toyworld, builtin:toyworld-clip, builtin:identities"):
        parse_request(with_(model="builtin:nope"))


def test_duplicate_keys_and_deep_nesting_are_refused(tmp_path):
    (tmp_path / "twice.yaml").write_text(
        "model: builtin:tiny\nconcepts: [{name: cat, anchor: dog}]\nconcepts: [{name: car, anchor: bus}]\n"
    )
    with pytest.raises(RequestError, match=r"a key appears twice; give each key once \(line 3, column 1\)"):
        load_request(tmp_path / "twice.yaml")
    (tmp_path / "twice.json").write_text('{"model": "builtin:tiny", "seed": 1, "seed": 2, "concepts": []}')
    with pytest.raises(RequestError, match="'seed' appears twice"):
        load_request(tmp_path / "twice.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RequestError, match="nested too deeply"):
        load_request(tmp_path / "deep.json")


def test_look_alike_names_are_one_concept():
    full_width = with_(concepts=[{"name": "Jane Doe", "kind": "person"}, {"name": "Ｊａｎｅ　Ｄｏｅ", "kind": "person"}])
    with pytest.raises(RequestError, match="duplicate concept"):
        parse_request(full_width)
    accents = with_(concepts=[{"name": "caf\u00e9", "anchor": "bar"}, {"name": "cafe\u0301", "anchor": "bar"}])
    with pytest.raises(RequestError, match="duplicate concept"):
        parse_request(accents)


def test_markup_in_names_and_paths_is_printed_not_interpreted(tmp_path):
    (tmp_path / "x[red].yaml").write_text(yaml.safe_dump(with_(model="[/]")))
    result = CliRunner().invoke(app, ["erase", str(tmp_path / "x[red].yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output  # a clean refusal, not a rich MarkupError traceback
    assert "[/]" in result.output


def test_a_runner_with_an_input_root_refuses_files_outside_it(tmp_path, monkeypatch):
    inside, outside = tmp_path / "inputs", tmp_path / "secrets"
    inside.mkdir(), outside.mkdir()
    (inside / "captions.txt").write_text("a dog\n")
    (outside / "token").write_text("s3cret-token\n")
    monkeypatch.setenv("ERASURE_INPUT_ROOT", str(inside))
    assert parse_request(with_(preserve={"captions": str(inside / "captions.txt")})).preserve.captions_sha256
    with pytest.raises(RequestError, match="preserve.captions: .* is outside ERASURE_INPUT_ROOT"):
        parse_request(with_(preserve={"captions": str(outside / "token")}))
    with pytest.raises(RequestError, match="preserve.captions: .* is outside ERASURE_INPUT_ROOT"):
        parse_request(with_(preserve={"captions": "../secrets/token"}), base_dir=inside)
    with pytest.raises(RequestError, match="model: .* is outside ERASURE_INPUT_ROOT"):
        parse_request(with_(model=str(outside)))


def test_an_input_root_is_checked_through_symlinks_inside_it_and_again_when_a_worker_loads(tmp_path, monkeypatch, tiny_folder):
    """Issue 22, finding 9: a model folder under ERASURE_INPUT_ROOT whose unet/ was a symlink to a
    UNet outside it was loaded and erased; and takedown, restore and audit of a registered version
    reused its request.json's paths without checking the root again."""
    import shutil

    from tasks.worker import ConceptWorker

    inside, outside = tmp_path / "inputs", tmp_path / "elsewhere"
    inside.mkdir(), outside.mkdir()
    shutil.copytree(tiny_folder, inside / "model")
    shutil.move(inside / "model" / "unet", outside / "unet")
    (inside / "model" / "unet").symlink_to(outside / "unet", target_is_directory=True)
    monkeypatch.setenv("ERASURE_INPUT_ROOT", str(inside))
    with pytest.raises(RequestError, match="model: .*unet.* leads outside ERASURE_INPUT_ROOT"):
        parse_request(with_(model=str(inside / "model")))
    # a registered request's path, never validated under this root: the worker checks it itself
    (outside / "model").mkdir()
    with pytest.raises(RequestError, match="model: .* is outside ERASURE_INPUT_ROOT"):
        ConceptWorker(str(outside / "model"), str(tmp_path / "store"))
    with pytest.raises(RequestError, match="model: .*unet.* leads outside ERASURE_INPUT_ROOT"):
        ConceptWorker(str(inside / "model"), str(tmp_path / "store"))
    (inside / "model" / "unet").unlink()
    (inside / "model" / "unet").symlink_to(inside / "model" / "unet")  # a loop: a message, not a traceback
    with pytest.raises(RequestError, match="symlink that cannot be followed"):
        parse_request(with_(model=str(inside / "model")))


@pytest.mark.parametrize(
    ("fusion", "method", "message"),
    [
        ({"method": "mace", "output_edit": 0.9}, {}, "fusion.output_edit acts on the constrained fusion"),
        ({"method": "separable", "closure": {}}, {"objective": "separable"}, "fusion.closure re-solves"),
        ({"closure": {"attacks": ["prefix", "prefix"]}}, {}, "name each attack once"),
        ({"closure": {"attacks": []}}, {}, "attacks"),
        ({"closure": {"max_success": 1.0}}, {}, "max_success"),
    ],
)
def test_closure_and_output_edit_settings_that_cannot_work_are_refused_naming_the_field(fusion, method, message):
    with pytest.raises(RequestError, match=message):
        parse_request({"concepts": [{"name": "red", "anchor": "white"}], "fusion": fusion, "method": method})


def test_closure_on_a_model_without_a_judge_fails_before_any_work_naming_the_setting(tiny):
    from erasure.erase import prepare_request

    request = parse_request({"model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "house"}],
                             "fusion": {"method": "mace", "closure": {}}})
    with pytest.raises(RequestError, match=r"fusion.closure: 'builtin:tiny' has no judge"):
        prepare_request(request, tiny)
