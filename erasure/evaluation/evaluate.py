"""Evaluating an erased model against its base: efficacy, generality, specificity, drift.

Both models draw every probe prompt with the same seed; a judge says which
images show the concept their prompt names. The result carries the images, so the
report can show them before/after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from erasure.diffusion.sampling import sample
from erasure.errors import NoJudgeError
from erasure.evaluation.metrics import harmonic_c, harmonic_o, pixel_drift, unconditional_drift


@dataclass
class Evaluation:
    """One evaluation: metrics of the erased and the base model, per-concept rows, the probes, both models' images and verdicts."""

    metrics: dict  # erased model: acc_e, acc_g, acc_s, h_o, pixel_drift, unconditional_drift
    base_metrics: dict  # the base model on the same probes: acc_e, acc_g, acc_s, h_o
    concepts: list[dict]  # one row per erased and retained concept
    probes: list
    base_images: torch.Tensor
    erased_images: torch.Tensor
    base_verdicts: list[bool]
    erased_verdicts: list[bool]
    calibration: dict | None = None  # what judges that calibrate on the base model's images report
    anchor_verdicts: list[bool | None] | None = None  # erased model: does the image show its concept's anchor


def _accuracies(probes, verdicts) -> dict[str, float]:
    by_group: dict[str, list[bool]] = {"erased": [], "synonym": [], "unseen": [], "phrasing": [], "retained": []}
    for probe, verdict in zip(probes, verdicts):
        by_group[probe.group].append(verdict)
    mean = lambda values: float(np.mean(values)) if values else float("nan")  # noqa: E731
    acc = {
        "acc_e": mean(by_group["erased"]),
        # generality: synonyms and paraphrases, and a compound concept's words in other orders
        "acc_g": mean(by_group["synonym"] + by_group["phrasing"]),
        "acc_s": mean(by_group["retained"]),
    }
    acc["h_o"] = harmonic_o(acc["acc_e"], acc["acc_s"], acc["acc_g"]) if by_group["retained"] else float("nan")
    # the celebrity benchmark's figure (efficacy and specificity only)
    acc["h_c"] = harmonic_c(acc["acc_e"], acc["acc_s"]) if by_group["retained"] and by_group["erased"] else float("nan")
    acc["acc_g_unseen"] = mean(by_group["unseen"])  # words never in training: nan when the world has none
    acc["acc_g_phrasing"] = mean(by_group["phrasing"])  # nan without compound concepts
    return acc


ERASED_GROUPS = ("erased", "synonym", "unseen", "phrasing")


def anchor_fidelity(probes, anchor_verdicts, concept: str | None = None) -> float:
    """The share of an erased concept's images (every erased group) that the judge sees as its anchor:
    erasure should draw the alternative the operator chose, not just anything else. NaN when the
    judge cannot see the anchor."""
    seen = [
        v for p, v in zip(probes, anchor_verdicts or [])
        if p.group in ERASED_GROUPS and v is not None and (concept is None or p.concept == concept)
    ]
    return float(np.mean(seen)) if seen else float("nan")


def _rows(probes, base_verdicts, erased_verdicts) -> list[dict]:
    rows: dict[tuple[str, str], dict] = {}
    for probe, before, after in zip(probes, base_verdicts, erased_verdicts):
        kind = "retained" if probe.group == "retained" else "erased"
        row = rows.setdefault((kind, probe.concept), {"concept": probe.concept, "role": kind, "_": {}})
        row["_"].setdefault(probe.group, []).append((before, after))
    out = []
    for row in rows.values():
        for group, pairs in row.pop("_").items():
            key = {
                "erased": "acc_e", "synonym": "acc_g", "unseen": "acc_g_unseen", "phrasing": "acc_g_phrasing", "retained": "acc_s",
            }[group]
            row[key] = float(np.mean([after for _, after in pairs]))
            row[f"base_{key}"] = float(np.mean([before for before, _ in pairs]))
            row[f"n_{key}"] = len(pairs)
        out.append(row)
    return out


def evaluate(
    erased_components, base_components, probes: list, judge, steps: int, guidance_scale: float, base_images=None,
    anchors: dict[str, str] | None = None,
) -> Evaluation:
    """Draw every probe with both models (or reuse ``base_images``) and judge them; with ``anchors``
    (concept -> anchor) and a judge that can see them, also the anchor fidelity."""
    prompts, seeds = [p.prompt for p in probes], [p.seed for p in probes]
    if base_images is None:
        base_images, _ = sample(base_components, prompts, seeds, steps=steps, guidance_scale=guidance_scale, batch_size=64)
    erased_images, _ = sample(erased_components, prompts, seeds, steps=steps, guidance_scale=guidance_scale, batch_size=64)
    # a judge with a decision threshold (CLIP) sets it on the base model's own images first
    calibration = judge.calibrate(base_images, probes) if hasattr(judge, "calibrate") else None
    if calibration is not None:  # {kind: calibration} from a judge per kind, or one judge's own
        reports = calibration if isinstance(calibration, dict) else {"all": calibration}
        calibration = {kind: c.as_dict() if hasattr(c, "as_dict") else c for kind, c in reports.items()}
    base_verdicts = judge.verdicts(base_images, probes)
    erased_verdicts = judge.verdicts(erased_images, probes)
    retained = [i for i, p in enumerate(probes) if p.group == "retained"]
    metrics = _accuracies(probes, erased_verdicts)
    metrics["pixel_drift"] = pixel_drift(erased_images[retained], base_images[retained]) if retained else float("nan")
    metrics["unconditional_drift"] = unconditional_drift(erased_components, base_components, steps=steps)
    anchor_verdicts = None
    if anchors and hasattr(judge, "anchor_verdicts"):
        anchor_verdicts = judge.anchor_verdicts(erased_images, probes, anchors)
    metrics["anchor_fidelity"] = anchor_fidelity(probes, anchor_verdicts)
    rows = _rows(probes, base_verdicts, erased_verdicts)
    for row in rows:
        if row["role"] == "erased":
            row["anchor_fidelity"] = anchor_fidelity(probes, anchor_verdicts, row["concept"])
    return Evaluation(
        metrics=metrics,
        base_metrics=_accuracies(probes, base_verdicts),
        concepts=rows,
        probes=probes,
        base_images=base_images,
        erased_images=erased_images,
        base_verdicts=base_verdicts,
        erased_verdicts=erased_verdicts,
        calibration=calibration,
        anchor_verdicts=anchor_verdicts,
    )


def has_judge(model: str) -> bool:
    """Whether ``model`` is a built-in model whose world has a judge (only those are evaluated after a run)."""
    from erasure.worlds.builtins import find_builtin

    try:
        builtin = find_builtin(model)
    except ValueError:
        return False
    return builtin is not None and builtin.judge is not None


def probes_and_judge(request, base: str | None = None):
    """The probes and the judge of the base model's world (``erasure.worlds.builtins``)."""
    from erasure.spec import builtin_names
    from erasure.worlds.builtins import find_builtin

    base = base or request.model
    builtin = find_builtin(base) if has_judge(base) else None
    if builtin is None:
        judged = [name for name in builtin_names() if has_judge(name)]
        raise NoJudgeError(
            f"no judge for base model {base!r}: evaluating needs a judge of the model's world, and only "
            f"{', '.join(judged)} ship one here"
        )
    return builtin.judge(request)


def evaluate_request(
    model, request, base: str | None = None, device: str = "cpu", base_images=None, base_components=None
) -> Evaluation:
    """Evaluate an erased ``model`` (folder or loaded components) for ``request`` against its base model
    (``base_components`` when the caller has it loaded already)."""
    from erasure.diffusion.models import Components, sampler_settings
    from erasure.loading import load_components

    base = base or request.model
    probes, judge = probes_and_judge(request, base)
    erased = model if isinstance(model, Components) else load_components(str(model), device)
    base_components = base_components or load_components(base, device)
    steps, guidance = sampler_settings(base_components, request.method.sampler_steps, request.method.guidance_scale)
    anchors = {c.name: c.anchor for c in request.concepts}
    return evaluate(erased, base_components, probes, judge, steps, guidance, base_images=base_images, anchors=anchors)


def evaluation_json(evaluation: Evaluation) -> dict:
    """The metrics file: keys ``acc_e, acc_g, acc_s, h_o`` first (acc_g: trained synonyms and
    paraphrases), then ``acc_g_unseen`` (words never in training), anchor fidelity, drift, base
    model, per concept."""
    def plain(value):  # JSON has no NaN: a metric without probes is null
        return None if isinstance(value, float) and math.isnan(value) else value

    return {
        **{k: plain(evaluation.metrics[k]) for k in ("acc_e", "acc_g", "acc_s", "h_o", "h_c", "acc_g_unseen", "acc_g_phrasing")},
        "anchor_fidelity": plain(evaluation.metrics["anchor_fidelity"]),
        "pixel_drift": evaluation.metrics["pixel_drift"],
        "unconditional_drift": evaluation.metrics["unconditional_drift"],
        "base": {k: plain(v) for k, v in evaluation.base_metrics.items()},
        "probes": len(evaluation.probes),
        "concepts": [{k: plain(v) for k, v in row.items()} for row in evaluation.concepts],
    }
