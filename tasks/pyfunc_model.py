"""The registered model's pyfunc, logged as code (MLflow's models-from-code): no pickle, MLflow
runs this file when it loads the model.

A version holds no weights: its ``model_config`` names them in the artifact store
(``store_url``, ``s3_endpoint``, ``model_key``, and ``sha256``, the digest of the
artifact's manifest). ``load_context`` fetches the erased pipeline from the store,
checks every file's checksum and the manifest's digest, and loads it. S3 credentials
come from the loading environment (never from the model). To load from a copy of the
store elsewhere: ``mlflow.pyfunc.load_model(uri, model_config={...})``.

Input: a list of prompts or a DataFrame with a ``prompt`` column (optional ``seed``
column). Output: uint8 images, (n, H, W, 3). Sampler settings are the model's own.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

REFERENCE_KEYS = ("store_url", "model_key", "sha256")
MAX_PROMPTS_PER_CALL = 256


class ErasedPipelineModel(PythonModel):
    """The registered version as MLflow serves it: prompts (and seeds) in, uint8 images out."""

    def load_context(self, context):
        from erasure.loading import load_model
        from tasks.store import store_from_url

        config = dict(context.model_config or {})
        missing = [k for k in REFERENCE_KEYS if not config.get(k)]
        if missing:
            raise ValueError(f"the model's config lacks {', '.join(missing)}: it does not name its weights")
        store = store_from_url(config["store_url"], config.get("s3_endpoint") or None)
        folder = Path(tempfile.mkdtemp(prefix="erasure-model-"))
        try:
            store.fetch(config["model_key"], folder / "model", expect_sha256=config["sha256"])
            self.components = load_model(str(folder / "model"), "cpu")  # read into memory (a family's pipeline too)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def predict(self, context, model_input, params=None):
        import numpy as np

        from erasure.diffusion.models import sampler_settings
        from erasure.diffusion.sampling import sample
        from erasure.spec import MAX_PROMPT_CHARS, MAX_SEED, printable_text

        if hasattr(model_input, "columns"):
            prompts = [str(p) for p in model_input["prompt"]]
            seeds = [int(s) for s in model_input["seed"]] if "seed" in model_input.columns else list(range(len(prompts)))
        else:
            prompts = [str(p) for p in model_input]
            seeds = list(range(len(prompts)))
        if not 1 <= len(prompts) <= MAX_PROMPTS_PER_CALL:
            raise ValueError(f"give 1 to {MAX_PROMPTS_PER_CALL} prompts per call, not {len(prompts)}")
        for i, prompt in enumerate(prompts):
            try:
                prompts[i] = printable_text(prompt, MAX_PROMPT_CHARS)
            except ValueError as error:
                raise ValueError(f"prompt {i}: {error}") from None
        if any(not 0 <= seed <= MAX_SEED for seed in seeds):
            raise ValueError(f"seeds must lie in 0..{MAX_SEED}")
        # sample() draws in batches of 16 (a family's pipeline one image at a time): memory stays bounded
        images, _ = sample(self.components, prompts, seeds, *sampler_settings(self.components))
        return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


set_model(ErasedPipelineModel())
