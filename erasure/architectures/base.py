"""What an architecture adapter says about one model family.

A family is a diffusers pipeline class whose denoiser reads text through linear maps. The
closed forms need three facts of it, and nothing else:

- the **text streams**: each is a set of linear maps that all read the same text states
  (per-block cross-attention K/V, or one shared text projection such as ``context_embedder``;
  a pooled-text path is a second stream), so one text-side solve serves them all;
- the **states** of each stream for a list of prompts, exactly as the pipeline feeds them
  (``encode_prompt``, then whatever fixed map sits before the edited ones), and the token
  segments those states are laid out in, for aligning a concept prompt with its anchor;
- the **unconditional** states, which the edit must leave exactly unchanged.

Sampling, saving and loading go through the pipeline class itself, so what we write is
what ``<PipelineClass>.from_pretrained`` reads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EditedMap:
    """One linear map of the denoiser that reads a stream: the module's dotted name and the
    input columns that hold the stream (SDXL's ``add_embedding`` reads the pooled text and
    the size conditioning side by side; only the text's columns are edited). None: all."""

    module: str
    columns: tuple[int, int] | None = None


@dataclass(frozen=True)
class Segment:
    """A run of positions in a token stream made by one tokenizer (SD3's stream is CLIP's 77
    positions, then T5's): ``tokenizer`` is the pipeline's attribute, ``length`` its padding."""

    tokenizer: str
    length: int


@dataclass(frozen=True)
class TextStream:
    """Maps that read the same text states. ``segments``: the token layout of those states;
    empty for a pooled stream (one state per prompt)."""

    name: str
    maps: tuple[EditedMap, ...]
    segments: tuple[Segment, ...] = ()

    @property
    def pooled(self) -> bool:
        return not self.segments


class Architecture:
    """The adapter of one pipeline family. Subclasses set the class attributes and
    implement ``streams``, ``states`` and ``sample_kwargs``."""

    family: str = ""
    pipeline_classes: tuple[str, ...] = ()  # the diffusers pipeline classes of this family
    denoiser_name: str = "unet"  # the pipeline's attribute that denoises
    supports_lora_loading: bool = True  # the pipeline class has diffusers' ``load_lora_weights``

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    def streams(self, pipe) -> tuple[TextStream, ...]:
        raise NotImplementedError

    def states(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per stream, the states its maps read for ``prompts``: (n, L, d), or (n, 1, d) pooled."""
        raise NotImplementedError

    def unconditional_states(self, pipe) -> dict[str, torch.Tensor]:
        """Per stream, (L, d) states of the unconditional input, which the edit must hold still.
        Default: those of the empty prompt (what the pipelines encode as the negative prompt)."""
        return {name: states[0] for name, states in self.states(pipe, [""]).items()}

    def tokenized_text(self, pipe, prompts: list[str]) -> list[str]:
        """The text the pipeline's tokenizers see for ``prompts`` (PixArt lower-cases it first)."""
        return prompts

    def text_settings(self, pipe) -> dict:
        """Settings of this machine that change what text the model reads (recorded in the manifest)."""
        return {}

    def sample_kwargs(self, pipe, size: int | None) -> dict:
        """Keyword arguments every call of the pipeline needs (text lengths, for example)."""
        return {}

    def sample(
        self, pipe, prompts: list[str], seeds: list[int], steps: int | None = None, guidance_scale: float | None = None,
        size: int | None = None,
    ) -> torch.Tensor:
        """One image per prompt through the pipeline's own ``__call__``, (n, 3, H, W) in [0, 1];
        image i depends on seeds[i] alone. ``steps``, ``guidance_scale``, ``size`` (pixels a side):
        None leaves the pipeline's own default (FLUX-dev's distilled guidance is 3.5, not SD's 7.5)."""
        if len(prompts) != len(seeds):
            raise ValueError("give one seed per prompt")
        pipe.set_progress_bar_config(disable=True)
        chosen = {"num_inference_steps": steps, "guidance_scale": guidance_scale, "height": size, "width": size}
        options = {k: v for k, v in chosen.items() if v is not None} | self.sample_kwargs(pipe, size)
        images = []
        for prompt, seed in zip(prompts, seeds):
            generator = torch.Generator("cpu").manual_seed(int(seed))
            images.append(pipe(prompt, generator=generator, output_type="pt", **options).images.float().cpu())
        return torch.cat(images)


def padded_length(pipe, tokenizer: str, pipeline_default: int) -> int:
    """The length a pipeline pads ``tokenizer``'s text to: its ``max_sequence_length`` default, or
    the tokenizer's own limit when shorter (our tiny models' 16 tokens)."""
    return min(getattr(pipe, tokenizer).model_max_length, pipeline_default)


def module_at(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    module = root.get_submodule(dotted)
    return module.base_layer if hasattr(module, "base_layer") else module  # a LoRA-wrapped layer: its base


def read_weight(denoiser: torch.nn.Module, edited: EditedMap) -> torch.Tensor:
    weight = module_at(denoiser, edited.module).weight.data
    if edited.columns is not None:
        weight = weight[:, edited.columns[0] : edited.columns[1]]
    return weight.detach().cpu().clone()


def write_weight(denoiser: torch.nn.Module, edited: EditedMap, weight: torch.Tensor) -> None:
    target = module_at(denoiser, edited.module).weight.data
    if edited.columns is not None:
        target = target[:, edited.columns[0] : edited.columns[1]]
    target.copy_(weight.to(target.device, target.dtype))


@dataclass
class LoadedPipeline:
    """A family's pipeline with its adapter: what a worker, an audit or a served model holds where
    the UNet path holds ``Components`` (``erasure.loading.load_model`` returns one or the other)."""

    pipe: object
    architecture: Architecture

    def sampler_defaults(self) -> tuple[int, float]:
        """The pipeline class's own steps and guidance (FLUX-dev's 3.5, SD 3's 7.0): its ``__call__``'s defaults."""
        parameters = inspect.signature(type(self.pipe).__call__).parameters
        return int(parameters["num_inference_steps"].default), float(parameters["guidance_scale"].default)

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float) -> torch.Tensor:
        return self.architecture.sample(self.pipe, prompts, seeds, steps, guidance_scale)
