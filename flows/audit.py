"""audit: a scheduled compliance check. Can the model still draw what it must not?"""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from erasure.evaluate import NoJudgeError
from erasure.spec import parse_request, registered_request
from tasks.registry import log_audit, resolve, version_request
from tasks.stages import stage_evaluate


class ConceptLeak(RuntimeError):
    """An audited model still draws concepts it must not."""


@flow(name="audit")
def audit_flow(model: str, request: dict | None = None, workers: int = 1) -> dict:
    """Audit a registered model (NAME, NAME@ALIAS, NAME/VERSION) against the request it was erased
    with, or any model (a folder or builtin) against ``request``. Fails, naming the concepts, when a
    concept's acc_e or acc_g is above the request's ``audit`` thresholds."""
    logger = get_run_logger()
    if request is None:
        version = resolve(model)
        spec = registered_request(version_request(version))
        model_key, name = version.tags["model_key"], version.name
    else:
        version, spec, model_key = None, parse_request(request), None
        name = model.replace("builtin:", "builtin-").replace("/", "-")
    evaluation = stage_evaluate(spec, model_key, workers)
    if evaluation is None:
        raise NoJudgeError(
            f"cannot audit {model!r}: no judge for base model {spec.model!r} (only the built-in models with a "
            "judge can be audited here); nothing was judged, so this is not a verdict on the model"
        )
    metrics = evaluation["metrics"]
    leaked = []
    for row in metrics["concepts"]:
        if row["role"] != "erased":
            continue
        if row.get("acc_e", 0) > spec.audit.max_acc_e or row.get("acc_g", 0) > spec.audit.max_acc_g:
            leaked.append(f"{row['concept']} (acc_e {row.get('acc_e', 0):.2f}, acc_g {row.get('acc_g', 0):.2f})")
    flat = {k: v for k, v in metrics.items() if isinstance(v, float)}
    run_id = log_audit(name, version, flat, not leaked, evaluation["report_html"], leaked)
    logger.info("audit of %s: %s", model, json.dumps(flat))
    if leaked:
        raise ConceptLeak(
            f"{model}: {len(leaked)} concept(s) leaked above acc_e {spec.audit.max_acc_e} / acc_g "
            f"{spec.audit.max_acc_g}: {'; '.join(leaked)} (report in MLflow run {run_id})"
        )
    return {"passed": True, "metrics": flat, "run_id": run_id}
