"""Every bad request fails with a message that says what to fix, and writes nothing."""

import json

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
    ],
)
def test_bad_requests_are_rejected_with_a_clear_message(tmp_path, data, message):
    with pytest.raises(RequestError, match=message):
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
