"""MACE end to end, as plain functions: one per stage, and ``erase`` that runs them in order.

Stages (docs/architecture.md, "One concept's journey"):

1. prior: the Gram matrix of the text states that must keep their K/V (the empty
   prompt, anchor prompts, retained concepts, a caption corpus);
2. per concept, independently: text statistics (CFR/fusion), images + attention
   masks, and a LoRA trained on the model refined by *that concept's own* CFR;
3. closed-form fusion of all concepts into one UNet.

A concept's artifacts depend only on (base model, concept spec, settings, seed),
never on which other concepts are erased with it: that is what lets takedown and
restore reuse them. ``erase`` writes its output folder atomically (a temporary
folder renamed at the end), so a failed run leaves nothing behind.

This is the UNet path: SD 1.x/2.x folders and hub ids, and the built-in worlds. SDXL, SD 3,
FLUX and PixArt folders are erased by ``erasure.erase_pipeline`` (the closed form through their
adapters), which shares this module's prior prompts, seeds and output-folder rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erasure import __version__
from erasure.artifacts import PRIOR_FILE, save_concept, save_prior, slug  # noqa: F401 (slug: re-exported)
from erasure.audit.closure import (
    CLOSURE_FILE,
    REFERENCE_IMAGES,
    Closure,
    ClosureConcept,
    adversarial_closure,
    closure_summary,
)
from erasure.core.attention import cross_attention_projections
from erasure.core.closed_form import (
    ConceptStatistics,
    PriorStatistics,
    apply_text_map,
    concept_statistics,
    refinement_map,
)
from erasure.core.prompts import augmented_pairs, preserve_prompt_groups
from erasure.core.text import align_tokens, empty_prompt_states, encode, tokenize
from erasure.diffusion.data import ConceptData, generate_concept_data, needs_images, no_images
from erasure.diffusion.lora import train_concept_lora
from erasure.diffusion.models import Components, apply_weights, fingerprint, sampler_settings, save_components
from erasure.diffusion.sampling import as_saved
from erasure.loading import load_components
from erasure.methods.alternative import train_alternative_lora
from erasure.methods.discovery import Discovery, alias_phrases, discover_aliases
from erasure.methods.fusion import FusableConcept, editable_projector, fuse, fusion_prior, fusion_solver  # noqa: F401 (FusableConcept: re-exported)
from erasure.methods.mining import mined_words, never_mined, with_perturbed_neighbours
from erasure.methods.separable import train_separable_increment
from erasure.spec import (
    CONCEPT_KINDS,
    ConceptSpec,
    ErasureRequest,
    FusionSettings,
    MiningSettings,
    PreserveSpec,
    RequestError,
    normalise,
    read_captions,
)
from erasure.staging import make_staging, remove_stale_staging
from erasure.worlds.builtins import concept_judge, find_builtin

Progress = Callable[[str, int, int], None]


def concept_seed(seed: int, concept: ConceptSpec) -> int:
    """A concept's seed depends on its name, not its position in the request."""
    digest = hashlib.sha256(f"{seed}:{normalise(concept.name)}".encode()).hexdigest()
    return int(digest[:8], 16)


def with_model_sampling(request: ErasureRequest, components: Components) -> ErasureRequest:
    """Fill unset sampler steps / guidance scale with the model's own (else the paper's)."""
    steps, guidance = sampler_settings(components, request.method.sampler_steps, request.method.guidance_scale)
    method = request.method.model_copy(update={"sampler_steps": steps, "guidance_scale": guidance})
    return request.model_copy(update={"method": method})


def prepare_request(request: ErasureRequest, components: Components, first_index: int = 0) -> ErasureRequest:
    """Stage 0, once the model is loaded: the checks that need its tokenizer, then its
    sampling defaults filled in. Every runner (``erase``, a worker, a benchmark) starts here.
    ``first_index``: where the request's first concept sits in the one the user wrote."""
    request.check_against_tokenizer(components.tokenizer, first_index)
    builtin = find_builtin(request.model)
    if builtin is not None and builtin.check_request is not None:
        builtin.check_request(request)
    for setting in request.judged_settings():
        check_judge_sees(request.model, request.concepts, setting, first_index)
    return with_model_sampling(request, components)


def check_judge_sees(model: str, concepts, setting: str, first_index: int = 0) -> None:
    """Alias discovery and closure judge with ``model``'s world's judge: a ``RequestError`` naming
    ``setting`` when there is none, or when it cannot see one of ``concepts``."""
    judge = concept_judge(model, setting)
    for index, concept in enumerate(concepts, start=first_index):
        try:
            judge.check(concept)
        except ValueError as error:
            raise RequestError(f"concepts.{index}.name: {setting}: {error}") from None


# --------------------------------------------------------------------------- stage 1: prior


def prior_prompts(preserve: PreserveSpec) -> list[str]:
    """The base prior's prompts, whose K/V must not move: "", retained concepts (in the
    templates of every kind), captions. Independent of which concepts are erased;
    each concept adds its own anchor prompts (``PriorStatistics.with_anchors``)."""
    prompts = [""] + [prompt for _, group in retained_prompt_groups(preserve.concepts) for prompt in group]
    if preserve.captions is not None:
        captions, _ = read_captions(preserve.captions, preserve.captions_sha256)
        prompts.extend(captions)
    return prompts


def retained_prompt_groups(concepts: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """(retained concept, its prompts) in the order the prior draws them: every kind's templates."""
    return [group for kind in CONCEPT_KINDS for group in preserve_prompt_groups({name: kind for name in concepts})]


def retained_prompts(made_from: tuple[str, ...], names: tuple[str, ...]) -> list[str]:
    """The prompts ``names`` contributed to a prior whose retained concepts were ``made_from`` (in
    order): what the prior loses when they stop being retained."""
    wanted = {normalise(n) for n in names}
    missing = wanted - {normalise(n) for n in made_from}
    if missing:
        raise ValueError(f"not retained in the prior: {', '.join(sorted(missing))}")
    return [prompt for name, group in retained_prompt_groups(made_from) if normalise(name) in wanted for prompt in group]


def without_retained(
    components: Components, prior: PriorStatistics, made_from: tuple[str, ...], names: tuple[str, ...]
) -> PriorStatistics:
    """``prior`` less the states of retained concepts ``names`` (a takedown of a concept the prior
    kept): exact, since a prior is a sum of ``e e^T`` and a count. ``made_from``: the retained
    concepts the prior's prompts were drawn for."""
    removed = prior_statistics(components, retained_prompts(made_from, names))
    return PriorStatistics(prior.total - removed.total, prior.count - removed.count)


def prior_statistics(components: Components, prompts: list[str], batch_size: int = 256) -> PriorStatistics:
    """The Gram statistics of ``prompts``' text states, encoded in batches."""
    prior = PriorStatistics.empty(components.text_encoder.config.hidden_size)
    for start in range(0, len(prompts), batch_size):
        ids, _ = tokenize(components.tokenizer, prompts[start : start + batch_size])
        prior.add(encode(components.text_encoder, ids))
    return prior


def base_prior(components: Components, preserve: PreserveSpec, fusion: FusionSettings) -> PriorStatistics:
    """Stage 1: the statistics of every prompt whose K/V must not move. With the constrained fusion,
    an error here, before any per-concept work, when they leave no direction to edit in (each
    concept's anchors only add to them)."""
    prior = prior_statistics(components, prior_prompts(preserve))
    if fusion.method == "constrained":
        editable_projector(empty_prompt_states(components), prior.gram(), fusion)
    return prior


# --------------------------------------------------------------------------- stage 2: per concept


@dataclass
class ConceptText:
    statistics: ConceptStatistics
    prompts: list[str]  # augmented concept prompts
    spans: list[tuple[int, ...]]  # the concept's token positions in each
    anchor_prompts: list[str] = field(default_factory=list)  # the same prompts with the anchor instead
    mined_words: list[tuple[str, float]] = field(default_factory=list)  # text neighbours mined, with their cosine
    discovery: Discovery | None = None  # the aliases found in the base model
    erased_aliases: list[str] = field(default_factory=list)  # the alias phrases erased with the concept (at most max_phrases)


def concept_pairs(
    components: Components,
    concept: ConceptSpec,
    prompt_count: int,
    seed: int,
    mining: MiningSettings | None = None,
    exclude: frozenset[str] = frozenset(),
    aliases: tuple[str, ...] = (),
) -> tuple[list[tuple[str, str]], list[tuple[str, float]]]:
    """A concept's (concept prompt, anchor prompt) pairs, and the text neighbours mined for it.
    ``aliases``: phrases the base model draws as the concept (alias discovery), erased with it."""
    mined = mined_words(components, concept, mining, exclude) if mining is not None else []
    variants = tuple(dict.fromkeys((*concept.variants, *aliases, *(word for word, _ in mined))))
    # the concept's own words keep their share, up to 4x the prompts (memory grows with them)
    count = min(prompt_count * len(variants) // len(concept.variants), 4 * prompt_count)
    pairs = augmented_pairs(concept.kind, variants, concept.anchor, count, (), seed)
    # the user's own prompts are matched with the concept's own words only: a mined word could
    # sit inside another word of the prompt
    pairs += augmented_pairs(concept.kind, concept.variants, concept.anchor, 0, concept.prompts, seed)
    return pairs, mined


def concept_text(
    components: Components,
    concept: ConceptSpec,
    prompt_count: int,
    seed: int,
    edit_tokens: str = "after",
    mining: MiningSettings | None = None,
    exclude: frozenset[str] = frozenset(),
    discovery: Discovery | None = None,
    max_aliases: int = 0,
) -> ConceptText:
    """Stage 2a: a concept's augmented prompt pairs, encoded, as sufficient statistics (CFR and fusion);
    with ``discovery``, its aliases (at most ``max_aliases`` phrases) are erased with it."""
    aliases = tuple(alias_phrases(concept, discovery, max_aliases)) if discovery is not None else ()
    pairs, mined = concept_pairs(components, concept, prompt_count, seed, mining, exclude, aliases)
    concept_ids, concept_lens = tokenize(components.tokenizer, [c for c, _ in pairs])
    anchor_ids, anchor_lens = tokenize(components.tokenizer, [a for _, a in pairs])
    alignments = [
        align_tokens(concept_ids[i].tolist(), int(concept_lens[i]), anchor_ids[i].tolist(), int(anchor_lens[i]))
        for i in range(len(pairs))
    ]
    concept_states = encode(components.text_encoder, concept_ids)
    statistics = concept_statistics(
        concept_states,
        encode(components.text_encoder, anchor_ids),
        [a.with_concept_tokens(edit_tokens) for a in alignments],
    )
    kept = [i for i, a in enumerate(alignments) if a.concept_span]
    if not kept:
        raise RequestError(f"concept {concept.name!r}: every prompt was truncated before the concept")
    if mining is not None and mining.perturbed_per_state + mining.beyond_per_state:
        span_states = torch.cat([concept_states[i, list(alignments[i].concept_span)] for i in kept])
        statistics = with_perturbed_neighbours(statistics, span_states, mining, seed)
    return ConceptText(
        statistics, [pairs[i][0] for i in kept], [alignments[i].concept_span for i in kept], [pairs[i][1] for i in kept],
        mined, discovery, list(aliases),
    )


@dataclass
class ConceptResult:
    """Everything one concept's stages made: text statistics, its CFR map, images and masks, its LoRA."""

    concept: ConceptSpec
    text: ConceptText
    text_map: torch.Tensor  # this concept's own CFR map M_k
    data: ConceptData
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    lora_state: dict[str, torch.Tensor]
    losses: list[float]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def statistics(self) -> ConceptStatistics:
        return self.text.statistics


def erase_concept(
    components: Components,
    concept: ConceptSpec,
    request: ErasureRequest,
    base_prior: PriorStatistics,
    progress: Progress | None = None,
    data: ConceptData | None = None,
) -> ConceptResult:
    """Every per-concept stage: text statistics, CFR map, images + masks, LoRA.

    Depends on nothing but the base model, this concept, the preserve settings and
    the method settings: the same inputs always give the same result. ``data``: images
    and masks already generated with the same settings (a benchmark comparing objectives
    draws them once).
    """
    settings, seed = request.method, concept_seed(request.seed, concept)
    if request.fusion.method == "constrained":
        # a prior published by an earlier run (MACE's fusion, say) skipped ``base_prior``'s check
        editable_projector(empty_prompt_states(components), base_prior.gram(), request.fusion)
    timer = time.perf_counter()
    exclude = never_mined(concept, request.preserve.concepts)
    discovery = None
    if settings.discovery is not None:
        discovery = discover_aliases(
            components, concept, settings.discovery, concept_judge(request.model, "method.discovery"), settings.sampler_steps,
            settings.guidance_scale, seed, exclude, progress,
        )
    seconds = {"discovery": time.perf_counter() - timer}
    timer = time.perf_counter()
    text = concept_text(
        components, concept, settings.prompts_per_concept, seed, settings.edit_tokens, settings.mining, exclude,
        discovery, settings.discovery.max_phrases if settings.discovery is not None else 0,
    )
    prior = base_prior.with_anchors([text.statistics]).gram()
    text_map = refinement_map([text.statistics], prior, request.preserve.lam1, request.preserve.ridge)
    seconds["text"] = time.perf_counter() - timer

    timer = time.perf_counter()
    if data is None:
        data = generate_concept_data(components, concept, settings, seed) if needs_images(settings) else no_images(concept)
    seconds["data"] = time.perf_counter() - timer

    timer = time.perf_counter()
    on_step = (lambda done, total: progress(f"LoRA {concept.name}", done, total)) if progress else None
    importance_sampling = settings.importance_sampling and concept.kind != "explicit"
    if settings.objective == "attention":
        factors, lora_state, losses = train_concept_lora(
            components, text_map, data.images, data.masks, text.prompts, text.spans,
            rank=settings.lora_rank, lr=settings.lora_lr, steps=settings.lora_steps,
            importance_sampling=importance_sampling, seed=seed, on_step=on_step,
        )
    elif settings.objective == "alternative":
        factors, lora_state, losses = train_alternative_lora(
            components, text_map, data.images, text.prompts, text.anchor_prompts,
            rank=settings.lora_rank, lr=settings.lora_lr, steps=settings.lora_steps,
            drift_weight=settings.alternative_drift_weight, importance_sampling=importance_sampling,
            seed=seed, on_step=on_step,
        )
    else:  # separable: SepME's increment acts on the base model's states; no CFR
        text_map = torch.eye(text_map.shape[0], dtype=text_map.dtype)
        factors, lora_state, losses = train_separable_increment(
            components, data.images, text.prompts, steps=settings.lora_steps,
            importance_sampling=importance_sampling, seed=seed, on_step=on_step, lr=settings.separable_lr,
            scale=settings.separable_scale, l1=settings.separable_l1, stop_below=settings.separable_stop_below,
        )
    seconds["lora"] = time.perf_counter() - timer
    return ConceptResult(concept, text, text_map, data, factors, lora_state, losses, seconds)


# --------------------------------------------------------------------------- stage 3: fusion


def cfr_only_weights(
    components: Components, concepts: list, prior: torch.Tensor, lam1: float, ridge: float
) -> dict[str, torch.Tensor]:
    """MACE's first stage alone (UCE-like): every K/V refined by CFR over all concepts at once."""
    text_map = refinement_map([c.statistics for c in concepts], prior, lam1, ridge)
    return {n: apply_text_map(p.weight.data, text_map) for n, p in cross_attention_projections(components.unet).items()}


def naive_merge_weights(
    components: Components, concepts: list, prior: torch.Tensor, lam1: float, ridge: float
) -> dict[str, torch.Tensor]:
    """The ablation the closed-form fusion replaces: CFR over all concepts plus the sum of all LoRAs."""
    weights = cfr_only_weights(components, concepts, prior, lam1, ridge)
    for concept in concepts:
        for name, (up, down) in concept.factors.items():
            weights[name] = weights[name] + (up @ down).to(weights[name].dtype)
    return weights


# --------------------------------------------------------------------------- the sequence, in one process


@dataclass
class StageOutputs:
    """What ``run_stages`` made in one process: the prepared request, the prior, every concept, the fused weights."""

    request: ErasureRequest  # prepared: the model's sampling settings filled in
    prior: PriorStatistics
    concepts: list[ConceptResult]
    weights: dict[str, torch.Tensor]  # the fused K/V projections
    seconds: dict[str, float]  # prior, concepts, fusion
    closure: Closure | None = None  # fusion.closure's rounds


def run_stages(components: Components, request: ErasureRequest, progress: Progress | None = None) -> StageOutputs:
    """Stages 0-3 on one loaded model: prepare, prior, every concept, fusion. ``erase`` and the
    benchmarks run this; the pipeline runs the same stage functions, one per worker call."""
    request = prepare_request(request, components)
    timer = time.perf_counter()
    prior = base_prior(components, request.preserve, request.fusion)
    seconds = {"prior": time.perf_counter() - timer}

    timer = time.perf_counter()
    results = []
    for index, concept in enumerate(request.concepts):
        if progress:
            progress("concepts", index, len(request.concepts))
        results.append(erase_concept(components, concept, request, prior, progress))
    if progress:
        progress("concepts", len(request.concepts), len(request.concepts))
    seconds["concepts"] = time.perf_counter() - timer

    timer = time.perf_counter()
    weights, closure = erased_weights(components, results, prior, request, progress)
    seconds["fusion"] = time.perf_counter() - timer
    return StageOutputs(request, prior, results, weights, seconds, closure)


def erased_weights(
    components: Components, results: list[ConceptResult], prior: PriorStatistics, request: ErasureRequest,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], Closure | None]:
    """Stage 3: the fused weights of ``results``, and with ``fusion.closure`` its adversarial closure
    (``erasure.audit.closure``) and its record (else None)."""
    if request.fusion.closure is None:
        return fuse(components, results, prior, request.preserve, request.fusion), None
    solve = fusion_solver(components, results, prior, request.preserve, request.fusion)
    items = [closure_concept(r.concept, r.data.images, r.text.erased_aliases, request.seed) for r in results]
    return closed_weights(components, request.model, items, solve, request.fusion.closure, request.method.sampler_steps,
                          request.method.guidance_scale, progress)


def closure_concept(concept: ConceptSpec, images: torch.Tensor, aliases, request_seed: int) -> ClosureConcept:
    """What closure needs of one concept; its first ``REFERENCE_IMAGES`` images, as its artifact saves
    them (8 bits), so a worker that reads them back closes exactly as one process does."""
    return ClosureConcept(concept, as_saved(images[:REFERENCE_IMAGES]), tuple(aliases), concept_seed(request_seed, concept))


def closed_weights(
    components: Components, model: str, items: list[ClosureConcept], solve, settings, steps: int, guidance_scale: float,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], Closure]:
    """Stage 3b: adversarial closure with ``model``'s world's judge; ``solve``: ``fusion_solver`` of the concepts."""
    judge = concept_judge(model, "fusion.closure")
    builtin = find_builtin(model)
    return adversarial_closure(components, items, solve, judge, settings, steps, guidance_scale, progress,
                               audit_templates=builtin.audit_templates if builtin is not None else ())


# --------------------------------------------------------------------------- end to end


@dataclass
class ErasureSummary:
    """What ``erase`` wrote: the output folder, the base model's fingerprint, seconds per stage, a row per concept."""

    out_dir: Path
    fingerprint: str
    seconds: dict[str, float]
    concepts: list[dict]
    closure: dict | None = None  # ``closure_summary`` of fusion.closure, when it ran


def erase(
    request: ErasureRequest,
    out_dir: Path,
    device: str = "cpu",
    progress: Progress | None = None,
    overwrite: bool = False,
) -> ErasureSummary:
    """Run MACE for ``request`` and write the erased model to ``out_dir``.

    ``out_dir`` receives ``model/`` (a diffusers folder with the erased UNet),
    ``concepts/<concept>/`` (its LoRA, statistics, images and masks; see
    ``erasure.artifacts``), ``prior.safetensors`` and ``manifest.json``.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    timer = time.perf_counter()
    components = load_components(request.model, device)
    base_fingerprint = fingerprint(components)
    seconds["load"] = time.perf_counter() - timer

    stages = run_stages(components, request, progress)
    request, prior, results, weights = stages.request, stages.prior, stages.concepts, stages.weights
    seconds |= stages.seconds

    timer = time.perf_counter()

    def write(staging: Path) -> dict:
        apply_weights(components.unet, weights)
        save_components(components, staging / "model")
        concept_rows = [save_concept(r, staging / "concepts" / slug(r.concept.name)) for r in results]
        save_prior(prior, staging / PRIOR_FILE)
        if stages.closure is not None:
            stages.closure.save(staging / "model" / CLOSURE_FILE)  # the model carries it, as the pipeline's does
        seconds["write"] = time.perf_counter() - timer
        seconds["total"] = time.perf_counter() - started
        return manifest_head(request, base_fingerprint) | {
            "prior_states": prior.count,
            "closure": closure_summary(stages.closure.as_dict()) if stages.closure is not None else None,
            "concepts": concept_rows,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }

    manifest = publish_erasure(out_dir, overwrite, write)
    concept_rows = manifest["concepts"]
    return ErasureSummary(out_dir, base_fingerprint, seconds, concept_rows, manifest["closure"])


MANIFEST_FILE = "manifest.json"


def manifest_head(request: ErasureRequest, base_fingerprint: str) -> dict:
    """What every erasure output's manifest starts with: who made it, from which model, asked what."""
    return {
        "erasure_version": __version__, "base_model": request.model, "base_fingerprint": base_fingerprint,
        "request": request.fingerprint_dict(), "versions": package_versions(),
    }


def publish_erasure(out_dir: Path, overwrite: bool, write: Callable[[Path], dict]) -> dict:
    """Publish an erasure output whole or not at all: ``write(staging)`` fills a hidden staging
    folder beside ``out_dir`` and returns the manifest, written last; the folder then replaces
    ``out_dir`` (``publish_output``). A killed earlier run's staging folders are removed first, and
    this one's on any failure. Returns the manifest."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir.parent, out_dir.name)  # a killed run's: "a failed run leaves nothing behind"
    if _is_erasure_output(out_dir):  # a killed --overwrite's previous output, superseded (else it is the only copy)
        remove_stale_staging(out_dir.parent, f"{out_dir.name}.old")
    staging = make_staging(out_dir.parent, out_dir.name)
    try:
        manifest = write(staging)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        check_output_folder(out_dir, overwrite)  # again: another run may have written it meanwhile
        publish_output(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output folder that would destroy something: the current folder, one of its
    parents, the home folder or ``/``; and, with ``overwrite``, any existing path that is not
    a previous erasure output (a folder with our ``manifest.json``)."""
    target = Path(out_dir).expanduser().resolve()
    cwd = Path.cwd().resolve()
    protected = {Path("/"), Path.home().resolve(), cwd, *cwd.parents}
    if target in protected:
        raise RequestError(
            f"--out {str(out_dir)!r} is {target} (the current folder, one of its parents, the home folder or /); "
            "give the erasure a folder of its own, e.g. --out runs/my-erasure"
        )
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise RequestError(f"output folder {str(out_dir)!r} already exists; choose another --out or pass --overwrite")
    if target.is_symlink() or not target.is_dir() or not _is_erasure_output(target):
        raise RequestError(
            f"--overwrite refuses {str(out_dir)!r}: it is not a previous erasure output (no {MANIFEST_FILE} of ours "
            "in it); choose another --out or remove it yourself"
        )


def _is_erasure_output(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "erasure_version" in manifest and "base_fingerprint" in manifest


def publish_output(staging: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Move the complete ``staging`` folder to ``out_dir``. A previous output (only with
    ``overwrite``) is moved aside first and deleted only once the new one is in place, so a crash
    at any point leaves either the old output or the new one (and at worst the old one beside it
    as ``.NAME.old.staging-*``). Without ``overwrite`` an output that appeared meanwhile is never touched."""
    if not overwrite or not out_dir.exists():
        try:
            os.rename(staging, out_dir)  # fails on a non-empty folder (another run's output)
        except OSError as error:
            if out_dir.exists():
                raise RequestError(
                    f"output folder {str(out_dir)!r} was written by another run meanwhile; choose another --out"
                ) from None
            raise error
        return
    aside = make_staging(out_dir.parent, f"{out_dir.name}.old")
    os.replace(out_dir, aside / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(aside / out_dir.name, out_dir)  # if this fails too, the old output stays in ``aside``
        os.rmdir(aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def package_versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
