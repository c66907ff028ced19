"""What an operator waits for: each pipeline command as a fresh process, end to end.

On the default toy world (examples/toyworld.yaml: red, circle, blue star), in an empty state
folder: ``erasure run`` (setup), then takedowns and restores of one concept, with and without
evaluating the new version. Two set-ups, side by side:

- **embedded**: nothing running beforehand; every command starts Prefect's temporary API
  server, a local Ray and its worker (the model loaded), and uses the SQLite registry;
- **services**: ``erasure services up --prefect`` first (SeaweedFS, MLflow and Prefect
  servers on 127.0.0.1, started once and not counted), then the same commands.

Each row is the command's wall time, and the flow's own seconds per stage (the rest is the
process: imports, Prefect's server, exit).

    python bench/cli_latency.py [--modes embedded,services] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ERASURE = str(Path(sys.executable).with_name("erasure"))

COMMANDS = [
    ("run (setup, 3 concepts, no evaluation)", ["run", str(ROOT / "examples" / "toyworld.yaml"), "--name", "demo", "--no-evaluate"]),
    ("takedown 1 concept, no evaluation", ["takedown", "demo", "blue", "--anchor", "white", "--no-evaluate"]),
    ("restore 1 concept, no evaluation", ["restore", "demo", "blue", "--no-evaluate"]),
    ("takedown 1 concept, evaluated", ["takedown", "demo", "star", "--anchor", "square"]),
    ("restore 1 concept, evaluated", ["restore", "demo", "star"]),
]


def timed(arguments: list[str], env: dict[str, str]) -> dict:
    timer = time.perf_counter()
    done = subprocess.run([ERASURE, *arguments], env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - timer
    if done.returncode != 0:
        raise SystemExit(f"erasure {' '.join(arguments)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    match = re.search(r"^seconds: (.*)$", done.stdout, re.M)
    stages = {k: float(v) for k, v in (item.rsplit(" ", 1) for item in match.group(1).split(", "))} if match else {}
    return {"wall": wall, "stages": stages, "process": wall - sum(stages.values())}


def services_env(env: dict[str, str]) -> dict[str, str]:
    done = subprocess.run([ERASURE, "services", "up", "--prefect"], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"erasure services up failed:\n{done.stdout}\n{done.stderr}")
    path = Path(env["ERASURE_STATE_DIR"]) / "services" / "env"
    extra = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        extra[key] = shlex.split(value)[0] if value else ""
    return env | extra


def run_mode(mode: str, root: Path) -> dict:
    env = os.environ | {
        "ERASURE_STATE_DIR": str(root / mode / "state"), "PREFECT_HOME": str(root / mode / "prefect"),
        "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "250",  # rich wraps at 80 when piped
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("ERASURE_STORE", None)
    Path(env["ERASURE_STATE_DIR"]).mkdir(parents=True)
    if mode == "services":
        env = services_env(env)
    rows = {}
    try:
        for label, arguments in COMMANDS:
            rows[label] = timed(arguments, env)
            print(f"{mode}: {label}: {rows[label]['wall']:.1f} s {rows[label]['stages']}", flush=True)
    finally:
        if mode == "services":
            subprocess.run([ERASURE, "services", "down"], env=env, capture_output=True, timeout=120)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="embedded,services")
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="erasure-cli-latency-"))
    modes = args.modes.split(",")
    report = {mode: run_mode(mode, root) for mode in modes}
    report["date"] = date.today().isoformat()
    report["machine"] = f"{os.cpu_count()} CPUs ({platform.machine()})"

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"command line, end to end ({os.cpu_count()} CPUs)")
    table.add_column("command")
    for mode in modes:
        table.add_column(f"{mode}: wall s", justify="right")
        table.add_column(f"{mode}: where it goes (s)")
    for label, _ in COMMANDS:
        cells: list[str] = []
        for mode in modes:
            row = report[mode][label]
            shown = {k: v for k, v in row["stages"].items() if v >= 0.05}
            cells += [f"{row['wall']:.1f}", ", ".join(f"{k} {v:.1f}" for k, v in shown.items()) + f"; process {row['process']:.1f}"]
        table.add_row(label, *cells)
    Console(width=200).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
