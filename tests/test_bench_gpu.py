"""bench/gpu.py runs end to end on the CPU with the tiny model (its CUDA-only parts need a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs a benchmark script end to end

ROOT = Path(__file__).resolve().parents[1]


def _is_duration(value) -> bool:
    """A benchmark's time, as written: a finite number of seconds. Tests check that the figure is
    there and well formed; how large it is is the benchmark's to measure, not a test's."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")


def test_gpu_benchmark_runs_end_to_end_with_tiny(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["concepts"] == 2 and report["device"] == "cpu (--tiny)"
    assert all(_is_duration(report["seconds_per_concept"][k]) for k in ("text", "data", "lora"))
    assert _is_duration(report["seconds"]["takedown"])
    memory = report["fusion_memory_mib"]
    assert memory["10"] == memory["100"] > 0  # sufficient statistics: flat in the number of concepts
    # timed, not asserted on: the tiny model's solve takes under a millisecond (it rounded to 0)
    assert all(_is_duration(report["fusion_cpu_float64_seconds"][n]["solve"]) for n in ("10", "100"))


def test_the_scale_benchmark_runs_end_to_end_with_tiny(tmp_path):
    """bench/scale.py --tiny: library and flow rows, fusion memory beside the reference-style
    fusion, takedown and restore on the largest model, so the script cannot rot."""
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--tiny", "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sizes"] == [1, 2] and "takedown of 1 concept" in done.stdout
    cut = report["takedown"]
    assert (cut["takedown"]["ran"], cut["takedown"]["reused"]) == (1, 2)  # only the new concept's work
    assert cut["restore"]["ran"] == 0 and cut["scratch"]["ran"] == 3
    memory = report["memory"]
    for n in ("1", "2"):
        assert memory[n]["max_weight_difference"] < 1e-5  # the reference-style fusion solves the same problem
        for workers in ("1", "2"):
            assert sum(report["flow"][workers][n]["concepts_per_worker"]) == int(n)
    assert memory["1"]["ours_mace"]["tensor_mib"] == memory["2"]["ours_mace"]["tensor_mib"]  # flat in N
    assert memory["2"]["reference_style"]["tensor_mib"] > memory["1"]["reference_style"]["tensor_mib"]  # grows with N


def test_the_per_concept_cost_benchmark_runs_end_to_end(tmp_path):
    """bench/concept_cost.py on the tiny model, so the script cannot rot."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "concept_cost.py"
    out = tmp_path / "cost.json"
    run = subprocess.run(
        [sys.executable, str(script), "--model", "builtin:tiny", "--concept", "cat", "--anchor", "dog", "--steps", "2",
         "--fusion-method", "mace", "--lora-steps", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["stages"]) >= {"text", "data", "lora"} and _is_duration(result["lora_step_ms"]) and _is_duration(result["bare_step_ms"])
    assert "MACE LoRA step" in run.stdout


def test_the_identity_benchmark_runs_end_to_end_with_tiny(tmp_path):
    """bench/identities.py --tiny: every row (MACE, the default, the closed forms, UCE-like, the
    OCE-style rotation) on 3 identities erased and 3 kept, so the script cannot rot."""
    out = tmp_path / "identities.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "identities.py"), "--tiny", "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    methods = [r["method"] for r in rows]
    assert methods[0] == "base model" and len(set(methods)) == len(methods) == 7
    assert {"MACE (paper settings)", "OCE-style rotation of V", "UCE-like (CFR only)"} <= set(methods)
    assert rows[0]["erased_drawn"] <= 3 and 0 <= rows[0]["capacity_rho"] <= 1
    for row in rows[1:]:
        assert 0 <= row["h_c"] <= 1 and _is_duration(row["seconds_per_concept"]) and row["fusion_peak_mb"] >= 0
    assert "H_c" in done.stdout and "capacity" in done.stdout


def test_the_gpu_benchmark_times_the_constrained_solve(tiny):
    """bench/gpu.py's closed-form timing under the default (constrained) fusion, which the GPU run
    and --fusion-only use; --tiny runs MACE's, so the end-to-end test above does not reach it."""
    sys.path.insert(0, str(ROOT))
    from bench.gpu import fusion_seconds

    seconds = fusion_seconds(tiny, 2, "constrained")
    assert _is_duration(seconds["accumulate"]) and _is_duration(seconds["solve"])


def test_the_family_benchmark_runs_every_family_end_to_end_with_tiny(tmp_path):
    out = tmp_path / "families.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--family", "all", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(out.read_text())["families"]
    assert [r["family"] for r in reports] == ["sdxl", "sd35-medium", "flux"]
    for report in reports:
        assert set(report["edited"]) == {"tokens", "pooled"}
        assert all(_is_duration(report["seconds"][k]) for k in ("prior", "fusion", "takedown", "restore"))
        memory = report["eraser_memory_mib"]
        assert memory["1"] == memory["2"] > 0  # sufficient statistics: flat in the number of concepts
        assert report["restorable_eraser_memory_mib"] > memory["2"]


def test_the_family_benchmark_refuses_to_run_without_a_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--family", "flux"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr


def test_real_size_configs_have_the_published_parameter_counts():
    """Built on the meta device (nothing allocated): the configs bench/gpu.py measures are the real models'."""
    sys.path.insert(0, str(ROOT))
    from bench.family_configs import parameters

    millions = {family: {k: round(v / 1e6) for k, v in parameters(family).items()} for family in ("sdxl", "sd35-medium", "flux")}
    assert millions["sdxl"]["unet"] == 2567 and millions["sdxl"]["text_encoder_2"] == 695
    assert millions["sd35-medium"]["transformer"] == 2243 and millions["sd35-medium"]["text_encoder_3"] == 4762
    assert millions["flux"]["transformer"] == 11901 and millions["flux"]["text_encoder"] == 123
