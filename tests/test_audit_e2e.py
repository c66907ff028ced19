"""The embedded default, end to end, as an operator runs it: no servers are started by the test.

`erasure run` erases, `erasure promote` refuses a version without a passing audit,
`erasure audit` passes it under the deployment's policy, promotion then succeeds,
the nightly deployment audits production, and a version that draws noise, one
registered with a request that loosened its own thresholds, and one whose
``model_key`` tag was edited all fail. Every command is a fresh process with the
service variables removed, so nothing but the embedded default can answer.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SERVICE_VARIABLES = ("MLFLOW_TRACKING_URI", "ERASURE_STORE", "ERASURE_S3_ENDPOINT", "RAY_ADDRESS", "PREFECT_API_URL",
                     "ERASURE_AUDIT_POLICY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # the last three: never inherited
# the CLIP world erases a colour within this small budget (on the MiniLM world one colour keeps
# acc_g above the default policy without alias discovery: see the README's table). Its 120 erasure
# prompts, not MACE's 30: with 30, one held-out audit template, "an illustration of a {}", drew
# red in 7 of 48 images (0 of 192 under the other eleven), so red leaked from its name in 2.7 %
# of 256 audit prompts and a 16-prompt audit failed about one time in 15 (it did in CI). With 120
# it leaks in 0.8 % of 256 (2026-12-07, seed 7).
REQUEST = """model: builtin:toyworld-clip
concepts: [{name: red, anchor: white}]
preserve: {concepts: [green, blue, yellow, purple, orange, cyan, white], lam1: 5, lam2: 5}
method: {images_per_concept: 4, lora_steps: 30, prompts_per_concept: 120}
"""
# the deployment's policy here: the default thresholds on 24 prompts a concept (12 a retained one;
# 7 retained concepts; the specificity floor is 80 % of the base model's). A model that leaks in
# 0.8 % of its images fails a 24-prompt audit (3 leaks) about once in 1,200 audits, a 16-prompt one
# (2 leaks) once in 150: the test audits this model four times.
POLICY = "probes_per_concept: 24\nretained_limit: 7\nmin_acc_s_ratio: 0.8\nattacks: []\n"


@pytest.fixture(scope="module")
def operator(tmp_path_factory):
    folder = tmp_path_factory.mktemp("operator")
    (folder / "request.yaml").write_text(REQUEST)
    (folder / "policy.yaml").write_text(POLICY)
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env |= {"ERASURE_STATE_DIR": str(folder / "state"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = str(Path(sys.executable).with_name("erasure"))

    def run(*args, timeout=600):
        return subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)

    return {"folder": folder, "run": run, "cli": cli, "env": env}


def kill_once_started(operator, *args) -> str:
    """Run ``erasure audit ARGS`` and ``kill -9`` its process group as soon as the audit has recorded
    its start, before any verdict: what a loop shopping for a lucky pass does to each audit that
    has not passed yet. Returns what the command printed."""
    log = operator["folder"] / "killed-audit.log"
    with log.open("w") as sink:
        audit = subprocess.Popen([operator["cli"], "audit", *args], cwd=operator["folder"], env=operator["env"],
                                 stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a bound on waiting, not a measurement
        while "started (seed" not in log.read_text():
            assert audit.poll() is None, f"the audit ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(audit.pid, signal.SIGKILL)
        audit.wait()
    return log.read_text()


# The tests below run in file order on one operator's state (pytest keeps a file's order): each
# step is a test of its own, so a failure names the step.


def test_run_registers_the_erased_version_as_candidate(operator):
    erased = operator["run"](operator["cli"], "run", "request.yaml", "--name", "erased-models")
    assert erased.returncode == 0, erased.stdout + erased.stderr
    assert "registered erased-models version 1" in erased.stdout


def test_the_deployment_policy_is_set_in_the_registry_and_loosening_it_needs_a_reason(operator):
    run, cli = operator["run"], operator["cli"]
    refused = run(cli, "policy", "set", "erased-models", "policy.yaml")
    assert refused.returncode == 2 and "more leniently" in refused.stdout + refused.stderr, refused.stderr
    accepted = run(cli, "policy", "set", "erased-models", "policy.yaml", "--reason", "CPU test budget")
    assert accepted.returncode == 0 and "loosens" in accepted.stdout, accepted.stdout + accepted.stderr
    shown = run(cli, "policy", "show", "erased-models")
    assert shown.returncode == 0 and '"probes_per_concept": 24' in shown.stdout


def test_promotion_needs_a_passing_audit_or_a_logged_override(operator):
    run, cli = operator["run"], operator["cli"]
    refused = run(cli, "promote", "erased-models", "1")
    assert refused.returncode == 2 and "no audit under the current policy" in refused.stdout + refused.stderr

    audited = run(cli, "audit", "erased-models@candidate")  # the deployment's policy, read from the registry
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "audit passed" in audited.stdout and "n=12" in audited.stdout and "--seed" in audited.stdout

    overridden = run(cli, "promote", "erased-models", "1", "--alias", "staging", "--override-audit", "legal sign-off #12")
    assert overridden.returncode == 0 and "audit overridden: legal sign-off #12" in overridden.stdout
    promoted = run(cli, "promote", "erased-models", "1")
    assert promoted.returncode == 0 and "audit passed (run" in promoted.stdout, promoted.stdout + promoted.stderr


def test_an_audit_killed_before_its_verdict_blocks_promotion_despite_an_earlier_pass(operator):
    """What a loop shopping for a lucky seed does: kill every audit before its verdict is known."""
    run, cli = operator["run"], operator["cli"]
    printed = kill_once_started(operator, "erased-models/1")
    refused = run(cli, "promote", "erased-models", "1", "--alias", "staging")
    assert refused.returncode == 2 and "has not completed" in refused.stdout + refused.stderr, refused.stderr
    # the killed audit is settled only by repeating it on its own probes (a fresh seed would be shopping)
    killed = re.search(r"MLflow run ([0-9a-f]{32})", printed).group(1)
    retried = run(cli, "audit", "erased-models/1", "--retry", killed)
    assert retried.returncode == 0 and "audit passed" in retried.stdout, retried.stdout + retried.stderr
    promoted = run(cli, "promote", "erased-models", "1", "--alias", "staging")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr


def test_the_nightly_audit_passes_production_and_broken_versions_fail(operator):
    run = operator["run"]
    cases = run(sys.executable, str(ROOT / "tests" / "e2e" / "audit_cases.py"), "policy.yaml", "request.yaml", timeout=900)
    assert cases.returncode == 0, cases.stdout[-3000:] + cases.stderr[-3000:]
    outcomes = json.loads(next(line for line in cases.stdout.splitlines() if line.startswith("OUTCOMES "))[9:])
    assert outcomes["nightly"] == {"outcome": "passed", "model": "erased-models@production"}
    assert outcomes["rerun_same"]
    assert outcomes["noise"]["outcome"] == "failed"
    assert any("retained concepts drawn" in r for r in outcomes["noise"]["reasons"])
    assert outcomes["loosened"]["outcome"] == "failed"
    assert any("red: drawn from its name" in r for r in outcomes["loosened"]["reasons"])
    assert outcomes["edited_tag"]["outcome"] == "failed"
    assert "tags were edited" in outcomes["edited_tag"]["reasons"][0]
