"""Content keys: every input that changes an artifact changes its key, and nothing else does."""

from erasure.spec import parse_request
from tasks.keys import concept_key, prior_key

BASE = {"model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}]}


def _request(tmp_path, folder: str, text: str):
    (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / folder / "captions.txt").write_text(text)
    return parse_request(BASE | {"preserve": {"captions": f"{folder}/captions.txt"}}, base_dir=tmp_path)


def test_captions_are_keyed_by_content_not_path(tmp_path):
    one, same_elsewhere = _request(tmp_path, "a", "a dog\n"), _request(tmp_path, "b", "a dog\n")
    other = _request(tmp_path, "c", "a tree\n")
    assert prior_key("fp", one) == prior_key("fp", same_elsewhere) != prior_key("fp", other)
    concept = one.concepts[0]
    assert concept_key("fp", concept, one) == concept_key("fp", concept, same_elsewhere) != concept_key("fp", concept, other)


def test_concept_keys_of_look_alike_names_differ(tmp_path):
    request = parse_request(BASE | {"concepts": [{"name": "van gogh", "kind": "style"}, {"name": "van-gogh", "kind": "style"}]})
    first, second = (concept_key("fp", c, request) for c in request.concepts)
    assert first != second and first.startswith("concepts/van-gogh-") and second.startswith("concepts/van-gogh-")
    assert first.split("-")[2] != second.split("-")[2]  # the name hash, readable in a listing
