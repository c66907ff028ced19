"""What importing the project does: no noise on a machine without torchvision, real warnings kept."""

import subprocess
import sys


def _stderr_of(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


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
