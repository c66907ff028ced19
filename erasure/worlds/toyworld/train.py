"""Training a toy world's text-to-image model (the CLIP world: UNet and text encoder jointly;
the MiniLM world: the UNet alone, on the frozen pretrained encoder).

Epsilon prediction with Min-SNR-5 loss weighting, AdamW with warm-up and cosine
decay, 10 % caption dropout (for classifier-free guidance), EMA weights saved.
Every step's data and noise derive from (seed, step), and a checkpoint is written
every ``checkpoint_every`` steps, so a killed run resumes exactly where it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erasure.core.text import encode, encoder_states, tokenize
from erasure.diffusion.models import save_components
from erasure.worlds.toyworld import world as toy_world
from erasure.worlds.toyworld.model import IMAGE_SIZE, build_toyworld_components, trains_text_encoder
from erasure.worlds.toyworld.settings import TRAINING

CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.999


def warmup_cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay(step: int) -> float:
    """A fast EMA while the weights move most (the first 1,000 steps), then the slow one."""
    return EMA_DECAY if step > 1000 else 0.99


def log_progress(log, done: int, steps: int, start: int, started: float, history: list[float]) -> None:
    """Every 100 steps: the mean loss of the last 100, the rate and what is left."""
    if done % 100 == 0:
        rate = (time.time() - started) / (done - start)
        log(f"step {done}/{steps} loss {np.mean(history[-100:]):.4f} ({rate:.2f}s/step, eta {rate * (steps - done) / 60:.0f} min)")


def write_checkpoint(state: dict, path: Path) -> None:
    """Written beside and renamed into place: a run killed while writing keeps its last checkpoint."""
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_toyworld(
    out_dir: Path,
    steps: int = TRAINING.steps,
    batch: int = TRAINING.batch,
    lr: float = TRAINING.lr,
    seed: int = TRAINING.seed,
    world: str = "minilm",
    checkpoint_every: int = TRAINING.checkpoint_every,
    eval_every: int = TRAINING.eval_every,
    warmup: int = TRAINING.warmup,
    evaluate=None,
    log=print,
    build=None,
    sample_batch=toy_world.sample_batch,
) -> tuple[Path, list[float]]:
    """Train and save the model (EMA weights) to ``out_dir / "model"``; returns (that folder, loss per step).

    ``evaluate(components) -> dict`` is called on the EMA model every
    ``eval_every`` steps and logged (the classifier's accuracy, in practice). Another world
    trained the same way (``erasure.worlds.identities``) passes its own ``build(seed) ->
    Components`` and ``sample_batch(rng, count, size) -> (images, captions, _)``; ``world``
    names it in the checkpoint.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    components = build(seed) if build is not None else build_toyworld_components(seed, world)
    unet, text_encoder, tokenizer, scheduler = (
        components.unet, components.text_encoder, components.tokenizer, components.scheduler,
    )
    joint = trains_text_encoder(components)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False) if joint else text_encoder
    parameters = list(unet.parameters()) + (list(text_encoder.parameters()) if joint else [])
    if not joint:  # frozen and pretrained: only the UNet learns, the encoder runs without dropout
        text_encoder.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    start = 0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=True)  # tensors and numbers only: never unpickle code
        if state.get("world", "clip") != world:  # checkpoints before the MiniLM world were all CLIP
            raise ValueError(
                f"{checkpoint_path} is a checkpoint of the {state.get('world', 'clip')!r} world, not {world!r}; "
                f"pass --world {state.get('world', 'clip')} or another --out"
            )
        unet.load_state_dict(state["unet"])
        ema_unet.load_state_dict(state["ema_unet"])
        if joint:
            text_encoder.load_state_dict(state["text_encoder"])
            ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log(f"resumed from step {start}")

    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # Min-SNR-gamma for epsilon prediction
    unet.train()
    if joint:
        text_encoder.train()
    started, history = time.time(), []
    for step in range(start, steps):
        rng = np.random.default_rng([seed, step])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        images, captions, _ = sample_batch(rng, batch, IMAGE_SIZE)
        captions = ["" if rng.random() < CAPTION_DROPOUT else c for c in captions]
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        if joint:
            states = encoder_states(text_encoder, tokenize(tokenizer, captions)[0])
        else:
            # encoded each step (a few % of a step): the 87,087 possible captions would take ~2.7 GB cached
            states = encode(text_encoder, tokenize(tokenizer, captions)[0])
        prediction = unet(noisy, t, encoder_hidden_states=states).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, steps, lr, warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema_update(ema_unet, unet, ema_decay(step))
        if joint:
            ema_update(ema_text, text_encoder, ema_decay(step))
        history.append(loss.item())
        done = step + 1
        log_progress(log, done, steps, start, started, history)
        if done % checkpoint_every == 0 or done == steps:
            state = {
                "unet": unet.state_dict(), "ema_unet": ema_unet.state_dict(), "optimizer": optimizer.state_dict(),
                "step": done, "world": world,
            }
            if joint:
                state |= {"text_encoder": text_encoder.state_dict(), "ema_text": ema_text.state_dict()}
            write_checkpoint(state, checkpoint_path)
        if evaluate is not None and (done % eval_every == 0 or done == steps):
            ema = dataclasses.replace(components, unet=ema_unet.eval(), text_encoder=ema_text.eval())
            log(f"eval at step {done}: {json.dumps(evaluate(ema))}")
            ema_unet.train(False)

    final = dataclasses.replace(components, unet=ema_unet.eval(), text_encoder=ema_text.eval())  # keeps its defaults
    save_components(final, out_dir / "model")
    return out_dir / "model", history
