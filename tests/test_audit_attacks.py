"""The audit's attack step on the tiny model with a scripted judge: every attack runs against the
erased model and against the base model (the control), on the same seeds, and lands in the report."""

from erasure.audit import attack_concept
from erasure.evaluate import evaluate
from erasure.policy import AuditPolicy
from erasure.probes import Probe
from erasure.report import write_report
from erasure.spec import parse_request


class ScriptedJudge:
    """Says an image shows the concept when its mean brightness is above the batch's median."""

    def __init__(self):
        self.calls = []

    def verdicts(self, images, probes):
        self.calls.append([p.group for p in probes])
        brightness = images.mean(dim=(1, 2, 3))
        return [bool(b >= brightness.median()) for b in brightness]


def test_every_attack_runs_on_both_models_and_its_images_reach_the_report(tiny, tmp_path):
    request = parse_request({
        "model": "builtin:tiny", "concepts": [{"name": "cat", "anchor": "dog"}], "fusion": {"method": "mace"},
    })
    probes = [Probe("erased", "cat", f"a photo of the cat {i}", {}, 10 + i) for i in range(4)]
    probes += [Probe("retained", "dog", "a dog", {}, 20 + i) for i in range(2)]
    judge = ScriptedJudge()
    evaluation = evaluate(tiny, tiny, probes, judge, steps=2, guidance_scale=2.0)
    policy = AuditPolicy(attack_budget={"images": 2, "inversion_steps": 10, "ring_a_bell_tokens": 2})
    rows, images = attack_concept(
        tiny, tiny, request, request.concepts[0], policy, judge, evaluation, seed=3, steps=2, guidance=2.0,
    )
    assert [r["attack"] for r in rows] == ["prefix", "inversion", "ring-a-bell"]
    for row in rows:
        assert 0.0 <= row["asr"] <= 1.0 and 0.0 <= row["base_asr"] <= 1.0 and row["n"] == 2
        shown = images[("cat", row["attack"])]
        assert shown["base_images"].shape == shown["erased_images"].shape == (2, *evaluation.base_images.shape[1:])
        assert len(shown["base_verdicts"]) == len(shown["erased_verdicts"]) == 2 and row["prompt"]
    assert judge.calls[-1] == ["attack", "attack"]
    report = write_report(evaluation, tmp_path / "r.html", "audit", attacks=images).read_text()
    assert "the base model attacked, the control" in report and report.count("data:image/png") >= 2 + 3
