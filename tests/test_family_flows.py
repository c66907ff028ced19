"""The distributed pipeline on a family's pipeline folder, as an operator runs it: ``erasure run``,
``takedown``, ``restore`` and ``audit`` on a tiny SDXL, each a fresh process on the embedded
default (local store, MLflow and Prefect; Ray in-process).

What is checked is what each command is for: the registered versions' weights are the closed
form's (the restore's version is bit for bit the erasure of what is left, made in one process by
``erasure erase``), every concept artifact is made once and reused by takedown and restore, a
registered version generates through MLflow's pyfunc, and the audit samples both pipelines
through their own class and never passes a random model (its judge cannot tell concepts apart
on the base model's images).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

SERVICE_VARIABLES = ("MLFLOW_TRACKING_URI", "ERASURE_STORE", "ERASURE_S3_ENDPOINT", "RAY_ADDRESS", "PREFECT_API_URL",
                     "ERASURE_AUDIT_POLICY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
PRESERVE = "preserve: {concepts: [dog, car, tree]}\nmethod: {lora_steps: 0}\n"


@pytest.fixture(scope="module")
def operator(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from erasure.architectures.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("family-operator")
    pipe = build_tiny_pipeline("sdxl")
    pipe.save_pretrained(folder / "sdxl")
    (folder / "request.yaml").write_text(
        f"model: {folder / 'sdxl'}\nconcepts: [{{name: cat, anchor: bird}}]\n" + PRESERVE
    )
    # a CLIP judge of the tiny pipeline's size, from a config (its own tokenizer: the pipeline's)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": pipe.tokenizer.vocab_size, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder / "judge")
    pipe.tokenizer.save_pretrained(folder / "judge")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder / "judge")
    judges = f"judges: {{object: {{clip: {folder / 'judge'}}}}}\n"
    # the audit's floor of 10 sampler steps, not SDXL's 50: what is tested is the path, not the pictures
    (folder / "policy.yaml").write_text("probes_per_concept: 4\nretained_limit: 2\nattacks: []\nsampler_steps: 10\n" + judges)
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env |= {"ERASURE_STATE_DIR": str(folder / "state"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = str(Path(sys.executable).with_name("erasure"))

    def run(*args, timeout=600):
        done = subprocess.run([cli, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        return done, done.stdout + done.stderr

    return {"folder": folder, "run": run, "env": env}


def _registered(operator) -> dict:
    """Versions 1 to 3's tags, and version 3 generating through MLflow's pyfunc, in a fresh process."""
    script = (
        "import json, mlflow\n"
        "from tasks.registry import resolve\n"
        "tags = {v: resolve(f'sdxl-erased/{v}').tags for v in (1, 2, 3)}\n"
        "images = mlflow.pyfunc.load_model('models:/sdxl-erased/3').predict(['a photo of a horse', 'a photo of a dog'])\n"
        "print('REGISTERED ' + json.dumps({'tags': tags, 'images': [list(images.shape), images.dtype.name]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=operator["folder"], env=operator["env"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("REGISTERED "))[11:])


def _published_model(operator, model_key: str) -> Path:
    found = [p for p in (operator["folder"] / "state").rglob("model_index.json") if model_key in str(p)]
    assert len(found) == 1, found
    return found[0].parent


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def test_run_takedown_and_restore_register_the_closed_forms_of_each_concept_set_and_serve_them(operator):
    run, folder = operator["run"], operator["folder"]
    done, printed = run("run", "request.yaml", "--name", "sdxl-erased")
    assert done.returncode == 0, printed[-4000:]
    assert "registered sdxl-erased version 1" in printed

    done, printed = run("takedown", "sdxl-erased@candidate", "horse", "--anchor", "dog")
    assert done.returncode == 0, printed[-4000:]
    assert "version 2" in printed and "per-concept stages: 1 ran, 1 reused" in printed  # cat's artifact is reused
    done, printed = run("restore", "sdxl-erased/2", "cat")
    assert done.returncode == 0, printed[-4000:]
    assert "version 3" in printed and "per-concept stages: 0 ran, 1 reused" in printed  # nothing is encoded

    registered = _registered(operator)
    tags = {int(v): t for v, t in registered["tags"].items()}
    assert [tags[v]["concepts"] for v in (1, 2, 3)] == ["cat", "cat, horse", "horse"]
    assert len({tags[v]["base_fingerprint"] for v in (1, 2, 3)}) == 1
    assert registered["images"] == [[2, 16, 16, 3], "uint8"]  # the pyfunc serves the family's pipeline

    # the restore's version is the closed form of horse alone, as one process makes it
    from erasure.erase_pipeline import erase_pipeline
    from erasure.spec import load_request

    (folder / "horse.yaml").write_text(f"model: {folder / 'sdxl'}\nconcepts: [{{name: horse, anchor: dog}}]\n" + PRESERVE)
    erase_pipeline(load_request(folder / "horse.yaml"), folder / "horse-alone")
    restored = _unet_weights(_published_model(operator, tags[3]["model_key"]))
    alone = _unet_weights(folder / "horse-alone" / "model")
    base = _unet_weights(folder / "sdxl")
    edited = [name for name in base if not torch.equal(base[name], alone[name])]
    assert edited and all("attn2.to_k" in n or "attn2.to_v" in n or "add_embedding.linear_1" in n for n in edited)
    for name in base:
        assert torch.allclose(restored[name], alone[name], atol=1e-6), name
    version_1 = _unet_weights(_published_model(operator, tags[1]["model_key"]))
    assert any(not torch.allclose(version_1[n], alone[n], atol=1e-4) for n in edited)  # cat's erasure is another model


def test_the_audit_samples_both_pipelines_and_proves_nothing_on_a_random_model(operator):
    run = operator["run"]
    done, printed = run("audit", "sdxl-erased/3", "--policy", "policy.yaml")
    # a random pipeline draws nothing a judge can tell apart: a leak or no verdict, never a pass
    assert done.returncode in (1, 3), printed[-4000:]
    assert "audit passed" not in printed
    found = re.search(r"audit of sdxl-erased/3 \(seed \d+\): (failed|inconclusive) (\{.*\})", printed)
    assert found, printed[-4000:]
    metrics = json.loads(found.group(2))
    # both pipelines sampled through their class: the erased one draws the retained prompts a little differently
    assert metrics["pixel_drift"] > 0 and metrics["unconditional_drift"] >= 0
