"""bench/gpu.py runs end to end on the CPU with the tiny model (its CUDA-only parts need a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_end_to_end_with_tiny(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["concepts"] == 2 and report["device"] == "cpu (--tiny)"
    assert all(report["seconds_per_concept"][k] > 0 for k in ("text", "data", "lora"))
    assert report["seconds"]["takedown"] > 0
    memory = report["fusion_memory_mib"]
    assert memory["10"] == memory["100"] > 0  # sufficient statistics: flat in the number of concepts


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
    assert set(result["stages"]) >= {"text", "data", "lora"} and result["lora_step_ms"] > 0 and result["bare_step_ms"] > 0
    assert "MACE LoRA step" in run.stdout
