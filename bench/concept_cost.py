"""Where one concept's time goes, and what a LoRA step costs against a bare UNet step.

On the default toy world (or any model): erases one concept with the library and prints
its stages (CFR text maps, data generation with masks, LoRA training), then times
MACE's LoRA step (forward with the attention probes, masked-attention loss, backward
into the LoRA, AdamW step) against a bare forward + backward of the same UNet on the
same batch (every weight trainable, a plain loss on the output), side by side.

    python bench/concept_cost.py                       # builtin:toyworld, concept "red"
    python bench/concept_cost.py --steps 100 --json bench/results/concept_cost.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from erasure.core.text import encode, tokenize  # noqa: E402
from erasure.diffusion.lora import train_concept_lora  # noqa: E402
from erasure.diffusion.sampling import encode_images, initial_noise  # noqa: E402
from erasure.erase import erase  # noqa: E402
from erasure.loading import load_components  # noqa: E402
from erasure.spec import parse_request  # noqa: E402


def lora_step_seconds(components, steps: int) -> float:
    """Mean seconds of one LoRA step (after 5 warm-up steps), as ``train_concept_lora`` runs it."""
    size = components.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    images = torch.rand(4, 3, size * (8 if components.vae is not None else 1), size * (8 if components.vae is not None else 1))
    masks = torch.ones(4, size, size, dtype=torch.bool)
    width = components.text_encoder.config.hidden_size
    stamps = []
    train_concept_lora(
        components, torch.eye(width), images, masks, ["a photo of the red circle"], [(4,)], rank=1, lr=1e-4,
        steps=steps + 5, importance_sampling=True, seed=0, on_step=lambda step, total: stamps.append(time.perf_counter()),
    )
    return (stamps[-1] - stamps[4]) / steps


def bare_step_seconds(components, steps: int) -> float:
    """Mean seconds of a bare forward + backward (every weight trainable) on the same batch shape."""
    unet = copy.deepcopy(components.unet).train().requires_grad_(True)
    ids, _ = tokenize(components.tokenizer, ["a photo of the red circle"])
    states = encode(components.text_encoder, ids).to(components.device, unet.dtype)
    latent = encode_images(components, torch.rand(1, 3, 16, 16)) if components.vae is None else initial_noise(components, [0])
    t = torch.tensor([500])
    stamps = []
    for _ in range(steps + 5):
        unet.zero_grad(set_to_none=True)
        unet(latent, t, encoder_hidden_states=states).sample.square().mean().backward()
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[4]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:toyworld")
    parser.add_argument("--concept", default="red")
    parser.add_argument("--anchor", default="white")
    parser.add_argument("--steps", type=int, default=50, help="timed steps of each kind")
    parser.add_argument("--fusion-method", default=None, help="the request's fusion.method (default: the request default)")
    parser.add_argument("--lora-steps", type=int, default=None, help="the request's method.lora_steps (default: the request default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    request = parse_request({
        "model": args.model, "concepts": [{"name": args.concept, "anchor": args.anchor}],
        **({"fusion": {"method": args.fusion_method}} if args.fusion_method else {}),
        **({"method": {"lora_steps": args.lora_steps}} if args.lora_steps else {}),
    })
    with tempfile.TemporaryDirectory() as folder:
        summary = erase(request, Path(folder) / "out")
    stages = summary.concepts[0]["seconds"]
    components = load_components(args.model)
    lora = lora_step_seconds(components, args.steps)
    bare = bare_step_seconds(components, args.steps)

    table = Table(title=f"one concept on {args.model} ({request.method.images_per_concept} images, {request.method.lora_steps} LoRA steps)")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in stages.items():
        table.add_row(stage, f"{seconds:.2f}")
    table.add_row("whole concept", f"{sum(stages.values()):.2f}")
    table.add_row("run's prior / fusion", f"{summary.seconds.get('prior', float('nan')):.2f} / {summary.seconds.get('fusion', float('nan')):.2f}")
    steps = Table(title=f"one training step, batch of 1, mean of {args.steps}")
    for column in ("step", "ms", "ratio"):
        steps.add_column(column, justify="right")
    steps.add_row("bare UNet forward + backward (all weights)", f"{1000 * bare:.1f}", "1.00")
    steps.add_row("MACE LoRA step (probes, masked loss, AdamW)", f"{1000 * lora:.1f}", f"{lora / bare:.2f}")
    console = Console(width=120)
    console.print(table)
    console.print(steps)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s)",
            "model": args.model, "concept": args.concept, "stages": stages, "run": summary.seconds,
            "lora_step_ms": 1000 * lora, "bare_step_ms": 1000 * bare, "ratio": lora / bare,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
