"""The audit's attack step on the tiny model with a scripted judge: every attack runs against the
base model (the control) and the erased model with the same search and seeds, and lands in the report."""

import torch

from erasure.audit.policy import AuditPolicy
from erasure.audit.run import attack_concept
from erasure.evaluation.evaluate import evaluate
from erasure.evaluation.report import write_report
from erasure.probes import Probe
from erasure.spec import parse_request


class AlternatingJudge:
    """On attack images, sees the concept in every image of its 1st, 3rd, ... call (the base model's,
    which the audit attacks first) and in none of the 2nd, 4th, ...: a swapped or miscounted
    success rate shows."""

    def __init__(self):
        self.attack_calls = 0

    def verdicts(self, images, probes):
        if probes[0].group != "attack":
            return [True] * len(probes)
        self.attack_calls += 1
        return [self.attack_calls % 2 == 1] * len(probes)


def test_every_attack_runs_on_both_models_with_the_same_search_and_reaches_the_report(tiny, tmp_path):
    request = parse_request({
        "model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}], "fusion": {"method": "mace"},
    })
    probes = [Probe("erased", "cat", f"a photo of the cat {i}", {}, 10 + i) for i in range(4)]
    probes += [Probe("retained", "dog", "a dog", {}, 20 + i) for i in range(2)]
    judge = AlternatingJudge()
    evaluation = evaluate(tiny, tiny, probes, judge, steps=2, guidance_scale=2.0)
    policy = AuditPolicy(attack_budget={"images": 2, "inversion_steps": 10, "ring_a_bell_tokens": 2})
    # the "erased" model is the base model itself: the same search on the same seeds must draw the same images
    rows, images = attack_concept(
        tiny, tiny, request, request.concepts[0], policy, judge, evaluation, seed=3, steps=2, guidance=2.0,
    )
    assert [r["attack"] for r in rows] == ["prefix", "inversion", "ring-a-bell"]
    assert judge.attack_calls == 6
    for row in rows:
        assert (row["base_asr"], row["asr"], row["n"]) == (1.0, 0.0, 2)
        assert row["prompt"] == row["base_prompt"]
        shown = images[("cat", row["attack"])]
        assert torch.equal(shown["base_images"], shown["erased_images"])
        assert shown["base_images"].shape == (2, *evaluation.base_images.shape[1:])
    report = write_report(evaluation, tmp_path / "r.html", "audit", attacks=images).read_text()
    assert "the base model attacked, the control" in report and report.count("data:image/png") >= 2 + 3


def test_attacks_prove_nothing_for_a_concept_the_base_model_does_not_draw(tiny):
    request = parse_request({"model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}]})
    probes = [Probe("erased", "cat", "a cat", {}, 1), Probe("retained", "dog", "a dog", {}, 2)]

    class Blind:
        def verdicts(self, images, probes):
            return [False] * len(probes)

    evaluation = evaluate(tiny, tiny, probes, Blind(), steps=2, guidance_scale=2.0)
    rows, images = attack_concept(tiny, tiny, request, request.concepts[0], AuditPolicy(), Blind(), evaluation, 0, 2, 2.0)
    assert images == {} and all(r["base_asr"] == 0.0 for r in rows) and len(rows) == 3
