"""What importing the project does: no noise on a machine without torchvision, real warnings kept."""

import importlib.util
import subprocess
import sys

import pytest


def _stderr_of(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed: no fallback")
def test_importing_the_pipelines_prints_no_torchvision_notice_and_other_warnings_still_show():
    stderr = _stderr_of(
        "import erasure.erase, cli.main\n"
        "from diffusers import StableDiffusionPipeline\n"
        "from transformers import CLIPImageProcessor, SiglipImageProcessor\n"
        "from transformers.utils import logging\n"
        "logging.get_logger('transformers.utils.import_utils').warning('a real warning')\n"
    )
    assert "torchvision" not in stderr
    assert "a real warning" in stderr


# --------------------------------------------------------------------------- the import graph

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("erasure", "tasks", "flows", "cli")
ORCHESTRATION = ("prefect", "ray", "boto3", "botocore", "mlflow")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules}
    return out


def test_no_import_cycle_among_the_projects_modules_lazy_imports_included():
    modules = _modules()
    graph = {name: {m for m in _imports(path, modules) if m in modules and m != name} for name, path in modules.items()}
    # a package's __init__ runs before any of its modules: importing erasure.x.y imports erasure.x
    for name in modules:
        graph[name] |= {parent for parent in (name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)) if parent in modules}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []
    assert len(modules) > 50 and graph["erasure.loading"] >= {"erasure.worlds.builtins", "erasure.diffusion.models"}


def test_the_science_imports_no_orchestration_anywhere_in_it():
    modules = _modules()
    leaks = {name: sorted(m for m in _imports(path, modules) if m.split(".")[0] in ORCHESTRATION)
             for name, path in modules.items() if name.split(".")[0] == "erasure"}
    assert {name: found for name, found in leaks.items() if found} == {}


def test_erasure_is_sub_packages_over_a_small_ground():
    top = sorted(p.stem for p in (ROOT / "erasure").glob("*.py") if p.stem != "__init__")
    packages = sorted(p.name for p in (ROOT / "erasure").iterdir() if (p / "__init__.py").is_file())
    assert packages == ["architectures", "audit", "core", "diffusion", "evaluation", "methods", "worlds"]
    # the ground (errors, the request, probes, staging folders), the stage sequences (the UNet path's and
    # the adapters') and their artifacts, any model's loading, and the two names older registered
    # versions' serving code imports
    assert top == ["artifacts", "erase", "erase_pipeline", "errors", "loading", "models", "probes", "sampling", "spec", "staging"]


def test_versions_registered_before_the_sub_packages_still_serve():
    """Each registered version logs its own copy of tasks/pyfunc_model.py; the copies made before
    erasure/ had sub-packages import these."""
    from erasure.diffusion.models import sampling_defaults as current_defaults
    from erasure.diffusion.sampling import sample as current_sample
    from erasure.loading import load_components as current_load
    from erasure.models import load_components, sampling_defaults
    from erasure.sampling import sample
    from erasure.spec import MAX_PROMPT_CHARS, MAX_SEED, printable_text  # noqa: F401
    from tasks.store import store_from_url  # noqa: F401

    assert (load_components, sampling_defaults, sample) == (current_load, current_defaults, current_sample)
    assert load_components("builtin:tiny").unet is not None


# the layers of erasure/, lowest first (docs/architecture.md): a module imports only from its own
# layer or the ones below it
LAYERS = [
    ("erasure", "erasure.errors", "erasure.spec", "erasure.probes", "erasure.staging"),
    ("erasure.core",),
    ("erasure.architectures",),
    ("erasure.diffusion",),
    ("erasure.methods", "erasure.artifacts"),
    ("erasure.worlds",),
    ("erasure.loading",),
    ("erasure.evaluation",),
    ("erasure.audit",),
    ("erasure.erase",),
    ("erasure.erase_pipeline",),
    ("erasure.models", "erasure.sampling"),  # the shims older registered versions import
]


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "erasure" and module.startswith(prefix + ".")):
                best = rank
    return 0 if best is None and module == "erasure" else best


def test_the_science_imports_only_from_its_own_layer_or_below():
    modules = _modules()
    science = {name: path for name, path in modules.items() if name.split(".")[0] == "erasure"}
    assert all(_layer(name) is not None for name in science), [n for n in science if _layer(n) is None]
    upward = sorted(
        f"{name} ({_layer(name)}) imports {target} ({_layer(target)})"
        for name, path in science.items()
        for target in _imports(path, modules)
        if target in science and _layer(target) > _layer(name)
    )
    assert upward == []
