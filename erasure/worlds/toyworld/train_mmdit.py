"""Training the joint-attention toy world (``erasure.worlds.toyworld.mmdit``) with flow matching.

The image at noise level sigma is ``(1 - sigma) x0 + sigma noise`` and the transformer predicts
the velocity ``noise - x0`` (SD 3's objective), sigma drawn logit-normal (SD 3's, which weights
the middle of the path where the scene is decided). Otherwise as the UNet worlds
(``erasure.worlds.toyworld.train``): the frozen encoder, 10 % caption dropout to the empty
prompt, AdamW with warm-up and cosine decay, EMA weights saved, every step's data and noise
derived from (seed, step), and a checkpoint every ``checkpoint_every`` steps to resume from.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erasure.architectures.base import LoadedPipeline
from erasure.worlds.toyworld import world as toy_world
from erasure.worlds.toyworld.mmdit import IMAGE_SIZE, ToyMMDiT, build_mmdit_pipeline, save_mmdit_pipeline
from erasure.worlds.toyworld.train import (
    CAPTION_DROPOUT,
    ema_decay,
    ema_update,
    log_progress,
    warmup_cosine_lr,
    write_checkpoint,
)

WORLD = "mmdit"  # the checkpoint's world: another world's checkpoint is refused


def train_mmdit(
    out_dir: Path, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0, checkpoint_every: int = 500,
    eval_every: int = 2000, warmup: int = 300, evaluate=None, log=print,
) -> tuple[Path, list[float]]:
    """Train and save the EMA transformer to ``out_dir / "model"``; returns (that folder, loss per step).
    ``evaluate(LoadedPipeline) -> dict`` is logged every ``eval_every`` steps."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    pipe = build_mmdit_pipeline(seed)
    transformer = pipe.transformer
    ema = copy.deepcopy(transformer).requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    start = 0
    # a resumed run is the same run only under the same settings (the schedule reads steps, the data seed and batch)
    settings = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "warmup": warmup}
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=True)  # tensors and numbers only: never unpickle code
        if state.get("world") != WORLD:
            raise ValueError(f"{checkpoint_path} is a checkpoint of the {state.get('world')!r} world, not {WORLD!r}; pass another --out")
        if state.get("settings") != settings:
            raise ValueError(
                f"{checkpoint_path} was made with {state.get('settings')}, not {settings}: resume with those settings or pass another --out"
            )
        transformer.load_state_dict(state["transformer"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log(f"resumed from step {start}")
    empty_states, empty_pooled = pipe.encode_prompt([""])
    transformer.train()
    started, history = time.time(), []
    for step in range(start, steps):
        rng = np.random.default_rng([seed, step])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        images, captions, _ = toy_world.sample_batch(rng, batch, IMAGE_SIZE)
        dropped = torch.from_numpy(rng.random(batch) < CAPTION_DROPOUT)
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        states, pooled = pipe.encode_prompt(captions)  # frozen encoder: no gradients
        states = torch.where(dropped[:, None, None], empty_states, states)
        pooled = torch.where(dropped[:, None], empty_pooled, pooled)
        velocity = transformer(
            hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=states, pooled_projections=pooled
        ).sample
        loss = F.mse_loss(velocity, noise - x0)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, steps, lr, warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, transformer, ema_decay(step))
        history.append(loss.item())
        done = step + 1
        log_progress(log, done, steps, start, started, history)
        if done % checkpoint_every == 0 or done == steps:
            state = {"transformer": transformer.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": done, "world": WORLD, "settings": settings}
            write_checkpoint(state, checkpoint_path)
        if evaluate is not None and (done % eval_every == 0 or done == steps):
            log(f"eval at step {done}: {json.dumps(evaluate(_with_transformer(pipe, ema)))}")
    final = _with_transformer(pipe, ema)
    save_mmdit_pipeline(final.pipe, out_dir / "model")
    return out_dir / "model", history


def _with_transformer(pipe, transformer) -> LoadedPipeline:
    evaluated = copy.copy(pipe)
    evaluated.register_modules(transformer=transformer.eval())
    return LoadedPipeline(evaluated, ToyMMDiT())
