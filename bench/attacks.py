"""Attack success on the default toy world: MACE against the best methods, one run, one table.

Each method erases the same concepts (``examples/toyworld.yaml``: red, circle, blue star, with
its retained concepts), then the compliance audit runs on it with every attack
(``erasure.audit.run.run_audit``): concept inversion (CCE), prefix search (UnlearnDiffAtk) and
Ring-A-Bell, each against the erased model and against the base model (the control: an attack
that fails there proves nothing). Same audit seed, probes and attack seeds for every method.

    python bench/attacks.py                      # the table, and bench/results/attacks.json
    python bench/attacks.py --rows "MACE (reference)" --images 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from erasure.audit.policy import AuditPolicy, judge_verdict  # noqa: E402
from erasure.audit.run import run_audit  # noqa: E402
from erasure.erase import erase  # noqa: E402
from erasure.evaluation.evaluate import evaluation_json  # noqa: E402
from erasure.evaluation.metrics import percent  # noqa: E402
from erasure.loading import load_components  # noqa: E402
from erasure.spec import parse_request  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# explicit per row, so a change of the request's defaults never changes a row
ROWS = {
    "MACE (reference)": ({"objective": "attention", "edit_tokens": "after", "discovery": None}, {"method": "mace"}),
    "span + constrained": ({"objective": "attention", "edit_tokens": "span", "discovery": None}, {"method": "constrained", "output_edit": None}),
    "span + constrained + RECE x2": (
        {"objective": "attention", "edit_tokens": "span", "discovery": None}, {"method": "constrained", "adversarial_rounds": 2, "output_edit": None},
    ),
    "span + constrained + alias discovery": (
        {"objective": "attention", "edit_tokens": "span", "discovery": {}}, {"method": "constrained", "output_edit": None},
    ),
    "span + constrained + alias discovery + closure": (
        {"objective": "attention", "edit_tokens": "span", "discovery": {}}, {"method": "constrained", "output_edit": None, "closure": {}},
    ),
    "span + constrained + output edit + alias discovery (examples/toyworld.yaml)": (
        {"objective": "attention", "edit_tokens": "span", "discovery": {}}, {"method": "constrained", "output_edit": 0.9},
    ),
    "span + constrained + output edit + alias discovery + closure": (
        {"objective": "attention", "edit_tokens": "span", "discovery": {}},
        {"method": "constrained", "output_edit": 0.9, "closure": {}},
    ),
}


MEASURING = ("probes_per_concept", "retained_limit", "attack_budget", "attacks", "sampler_steps", "guidance_scale")


def _earlier_rows(path: Path, results: dict, rerun: list[str]) -> dict:
    """The rows an earlier run measured the same way (request, seed, the policy's probes and attack
    budget) wrote and this run does not redo, kept with their date and the thresholds they were
    judged under: running one row updates the table instead of dropping the rest."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = earlier.get("request") == results["request"] and earlier.get("seed") == results["seed"] and all(
        earlier.get("policy", {}).get(k) == results["policy"][k] for k in MEASURING
    )
    if not same:
        return {}
    thresholds = {k: v for k, v in earlier["policy"].items() if k.startswith("max_") or k.startswith("min_")}
    return {
        name: row | {"date": row.get("date", earlier.get("date")), "judged_under": row.get("judged_under", thresholds)}
        for name, row in earlier.get("rows", {}).items() if name in ROWS and name not in rerun
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--request", type=Path, default=ROOT / "examples" / "toyworld.yaml")
    parser.add_argument("--images", type=int, default=16, help="attack images per concept, attack and model")
    parser.add_argument("--probes", type=int, default=16, help="audit prompts per concept")
    parser.add_argument("--seed", type=int, default=7, help="the audit's seed (probes, attack seeds)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "attacks.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base_request = yaml.safe_load(args.request.read_text())
    policy = AuditPolicy(probes_per_concept=args.probes, attack_budget={"images": args.images})
    base = load_components(parse_request(base_request).model)
    results = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s)",
        "request": str(args.request.relative_to(ROOT)), "policy": policy.model_dump(mode="json"), "seed": args.seed, "rows": {},
    }
    results["rows"] = _earlier_rows(args.json, results, args.rows)
    for name in args.rows:
        method, fusion = ROWS[name]
        request = parse_request(base_request | {"method": base_request.get("method", {}) | method, "fusion": fusion})
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            summary = erase(request, Path(folder) / "out")
            erased = load_components(str(Path(folder) / "out" / "model"))
        erase_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result = run_audit(erased, base, request, policy, args.seed, attacks=True)
        verdict = judge_verdict(evaluation_json(result.evaluation), policy, result.calibration, result.attacks)
        results["rows"][name] = {
            "metrics": {k: v for k, v in result.evaluation.metrics.items() if isinstance(v, float)},
            "attacks": result.attacks, "outcome": verdict.outcome, "reasons": verdict.failures + verdict.inconclusive,
            "erase_seconds": round(erase_seconds, 1), "audit_seconds": round(time.perf_counter() - started, 1),
            "closure": summary.closure,  # on its own training split, when the row closes
            "date": results["date"],
        }
        print(f"{name}: {verdict.outcome}, {json.dumps(result.attacks)}", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")  # after every row: a crash keeps what finished

    attacks = list(dict.fromkeys(a["attack"] for row in results["rows"].values() for a in row["attacks"]))
    table = Table(title=f"attack success (%) on {results['request']}, erased model (base model: the control), "
                        f"{args.images} images per concept and attack")
    table.add_column("method")
    table.add_column("audit acc_e / acc_g / acc_s")
    for attack in attacks:
        table.add_column(attack)
    table.add_column("outcome")
    for name, row in results["rows"].items():
        cells = []
        for attack in attacks:
            rows = [a for a in row["attacks"] if a["attack"] == attack]
            cells.append(", ".join(f"{a['concept']} {percent(a['asr'])} ({percent(a['base_asr'])})" for a in rows))
        m = row["metrics"]
        table.add_row(name, f"{percent(m['acc_e'])} / {percent(m['acc_g'])} / {percent(m['acc_s'])}", *cells, row["outcome"])
    Console(width=200).print(table)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
