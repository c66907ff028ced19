import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    """A test's tier by where it lives: every test in tests/integration/ is an integration test."""
    for item in items:
        if item.path.relative_to(TESTS).parts[0] == "integration":
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny():
    from erasure.diffusion.models import build_tiny_components

    return build_tiny_components().eval()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny):
    """The tiny pipeline saved as a diffusers folder."""
    from erasure.diffusion.models import save_components

    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_components(tiny, folder)
    return folder
