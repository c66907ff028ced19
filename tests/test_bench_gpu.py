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
