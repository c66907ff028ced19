"""The library's commands: erase, generate, evaluate, and the toy world's train / accuracy."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.app import (
    Bars,
    app,
    closure_line,
    console,
    device_or_default,
    fail,
    progress_bars,
    report_errors,
    setting,
    toyworld_app,
    warn,
)
from erasure.spec import DEFAULT_MODEL, SamplingSettings, builtin_names
from erasure.worlds.toyworld.settings import SAMPLING as TOY_SAMPLING
from erasure.worlds.toyworld.settings import TRAINING

SAMPLING = SamplingSettings()


class ToyWorld(StrEnum):
    minilm = "minilm"
    clip = "clip"
    identities = "identities"
    mmdit = "mmdit"


@app.command()
def erase(
    request: Path = typer.Argument(..., help="Request file (YAML or JSON): model, concepts, preserve, method."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the erased model, LoRAs and manifest to."),
    device: str = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    overwrite: bool = typer.Option(
        False, help="Replace --out if it holds a previous erasure output (moved aside until the new one is in place)."
    ),
    dtype: str = typer.Option(
        None, help="SDXL, SD3, FLUX and PixArt folders: load the weights as float32 (default), bfloat16 or float16."
    ),
) -> None:
    """Erase the request's concepts and write the erased model to --out."""
    from erasure.audit.closure import CLOSURE_FILE
    from erasure.erase import erase as run_erase
    from erasure.loading import pipeline_family
    from erasure.spec import load_request

    spec = report_errors(lambda: load_request(request))
    warn(spec.specificity_warnings())
    if report_errors(lambda: pipeline_family(spec.model)):  # a hub id off the worker's allow-list is refused here
        _erase_pipeline(spec, out, device, overwrite, dtype or "float32")
        return
    if dtype is not None:
        fail(f"--dtype applies to SDXL, SD3, FLUX and PixArt folders; {spec.model} is erased in float32 on the UNet path")

    def erased():
        with progress_bars() as progress:
            return run_erase(spec, out, device=device_or_default(device), progress=Bars(progress), overwrite=overwrite)

    summary = report_errors(erased)
    table = Table(title=f"erased {len(summary.concepts)} concept(s) -> {summary.out_dir}")
    for column in ("concept", "kind", "anchor", "mask cover", "LoRA loss first -> last", "seconds"):
        table.add_column(column)
    for row in summary.concepts:
        loss = f"{row['lora_loss_first']:.4g} -> {row['lora_loss_last']:.4g}" if row["lora_loss_first"] is not None else "-"
        table.add_row(
            escape(row["name"]), row["kind"], escape(row["anchor"]), f"{row['mask_coverage']:.0%}" if row["mask_coverage"] is not None else "-", loss,
            f"{sum(row['seconds'].values()):.1f}",
        )
    Console().print(table)
    if summary.closure:
        where = escape(str(summary.out_dir / "model" / CLOSURE_FILE))
        Console().print(closure_line(summary.closure, where), highlight=False, soft_wrap=True)
    Console().print(
        "stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary.seconds.items())
        + f"\nmodel: {summary.out_dir / 'model'}   try: erasure generate {summary.out_dir / 'model'} \"a photo of ...\""
    )


def _erase_pipeline(spec, out: Path, device: str | None, overwrite: bool, dtype: str) -> None:
    """``erase`` for an SDXL, SD3, FLUX or PixArt folder: the closed form through its adapter."""
    from erasure.erase_pipeline import erase_pipeline

    manifest = report_errors(
        lambda: erase_pipeline(spec, out, device=device_or_default(device), overwrite=overwrite, dtype=dtype)
    )
    table = Table(title=f"erased {len(manifest['concepts'])} concept(s) from {manifest['pipeline_class']} -> {escape(str(out))}")
    for column in ("concept", "kind", "anchor", "pairs", "to anchor: base -> erased", "retained drift"):
        table.add_column(column)
    for row in manifest["concepts"]:
        streams = row["to_anchor_before"]
        moved = ", ".join(f"{s} {row['to_anchor_before'][s]:.1%} -> {row['to_anchor_after'][s]:.1%}" for s in streams)
        drift = ", ".join(f"{s} {v:.2%}" for s, v in row["retained_drift"].items()) if row["retained_drift"] else "-"
        table.add_row(escape(row["name"]), row["kind"], escape(row["anchor"]), str(row["pairs"]), moved, drift)
    Console().print(table)
    edited = "; ".join(f"{stream}: {len(maps)} map(s)" for stream, maps in manifest["edited"].items())
    model = escape(str(out / "model"))
    Console().print(
        f"edited {edited} (closed form; distances are of the edited maps' outputs for \"a photo of ...\")\n"
        "stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in manifest["seconds"].items())
        + f"\nmodel: {model}   try: erasure generate {model} \"a photo of ...\"", highlight=False,
    )


@app.command(name="export-lora")
def export_lora(
    base: str = typer.Argument(..., help="The base model: a diffusers folder or a hub id."),
    erased: Path = typer.Argument(..., help="The erased model: an erase output folder or its model/."),
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the LoRA (pytorch_lora_weights.safetensors)."),
    energy: float = typer.Option(0.999, help="Share of each map's edit (squared norm) the low-rank factors keep."),
    dtype: str = typer.Option(None, help="Load both models as float32, bfloat16 or float16 (default: the erasure's own)."),
) -> None:
    """Export an erasure as a LoRA a served pipeline loads with load_lora_weights (and unloads)."""
    from erasure.architectures.lora_export import check_energy
    from erasure.architectures.lora_export import export_lora as run_export
    from erasure.architectures.registry import load_pipeline
    from erasure.erase_pipeline import check_erased_from, erasure_dtype
    from erasure.loading import model_folder
    from erasure.spec import RequestError

    report_errors(lambda: check_energy(energy))  # before two pipelines load

    def exported():
        folder = erased / "model" if (erased / "model" / "model_index.json").is_file() else erased
        loaded_as = dtype or erasure_dtype(erased)
        base_pipe, architecture = load_pipeline(model_folder(base), loaded_as)
        erased_pipe, erased_architecture = load_pipeline(folder, loaded_as)
        if erased_architecture is not architecture:
            raise RequestError(f"{base} is {architecture.family} but {folder} is {erased_architecture.family}")
        check_erased_from(base, base_pipe, erased)
        return run_export(base_pipe, erased_pipe, architecture, out, energy)

    report = report_errors(exported)
    table = Table(title=f"LoRA of the erasure -> {escape(str(out))}")
    for column in ("map", "rank", "relative error"):
        table.add_column(column)
    for row in report:
        table.add_row(escape(row.module), str(row.rank), f"{row.relative_error:.2e}")
    Console().print(table)
    Console().print(f"apply: pipe.load_lora_weights({str(out)!r}); remove: pipe.unload_lora_weights()", highlight=False)


@app.command()
def generate(
    model: str = typer.Argument(..., help=f"Model folder (e.g. OUT/model), hub id, or one of {', '.join(builtin_names())}."),
    prompts: list[str] = typer.Argument(..., help="One or more prompts."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Folder for the PNG files."),
    seed: int = typer.Option(0, help="Seed of the first image; image i uses seed + i."),
    steps: int = typer.Option(None, help=f"Sampler steps (default: the model's, else {SAMPLING.sampler_steps})."),
    guidance: float = typer.Option(
        None, help=f"Classifier-free guidance scale (default: the model's, else {SAMPLING.guidance_scale})."
    ),
    device: str = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
) -> None:
    """Sample images from a base or erased model."""
    from erasure.diffusion.models import sampler_settings
    from erasure.diffusion.sampling import sample, to_pil
    from erasure.loading import load_model

    seeds = [seed + i for i in range(len(prompts))]
    # SDXL, SD3, FLUX, PixArt sample through their pipeline class, at its own defaults unless given
    model_loaded = report_errors(lambda: load_model(model, device_or_default(device)))
    steps, guidance = sampler_settings(model_loaded, steps, guidance)
    images, _ = sample(model_loaded, list(prompts), seeds, steps=steps, guidance_scale=guidance)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        path = out / f"{i:03d}.png"
        to_pil(image).save(path)
        Console().print(f"{path}  {escape(prompt)}", highlight=False)


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="Erased model folder (e.g. OUT/model)."),
    request: Path = typer.Option(..., "--request", "-r", help="The request the model was erased with."),
    json_out: Path = typer.Option(..., "--json", help="Where to write the metrics (JSON)."),
    report: Path = typer.Option(None, help="HTML report with before/after grids (default: next to --json)."),
    base: str = typer.Option(None, help="Base model to compare with (default: the request's model)."),
    device: str = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
) -> None:
    """Measure efficacy (acc_e), generality (acc_g), specificity (acc_s) and drift; write JSON and a report."""
    import json

    from erasure.artifacts import discovered_aliases
    from erasure.evaluation.evaluate import evaluate_request, evaluation_json
    from erasure.evaluation.metrics import percent
    from erasure.evaluation.report import write_report
    from erasure.spec import RequestError, load_request

    def evaluated():
        if not model.is_dir():
            raise RequestError(f"model folder {str(model)!r} does not exist")
        with console.status("sampling base and erased models on the probe prompts"):
            return evaluate_request(model, spec, base=base, device=device_or_default(device))

    spec = report_errors(lambda: load_request(request))
    result = report_errors(evaluated)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(evaluation_json(result), indent=2) + "\n")
    report_path = write_report(
        result, report or json_out.with_suffix(".html"), title=f"Erasure report: {model}",
        details={"request": str(request), "base model": base or spec.model, "probes": len(result.probes)},
        # an erasure output's model/ sits beside its concepts/
        aliases=discovered_aliases(model.parent, [c.name for c in spec.concepts]),
    )
    table = Table(title="erasure metrics (%; acc_g: trained synonyms, paraphrases and other word orders; unseen: words never in training)")
    for column in ("model", "acc_e ↓", "acc_g ↓", "of which phrasing ↓", "acc_g unseen ↓", "acc_s ↑", "h_o ↑", "h_c ↑", "anchor ↑"):
        table.add_column(column)
    for label, values in (("base", result.base_metrics), ("erased", result.metrics)):
        keys = ("acc_e", "acc_g", "acc_g_phrasing", "acc_g_unseen", "acc_s", "h_o", "h_c", "anchor_fidelity")
        table.add_row(label, *(percent(values.get(k)) for k in keys))
    Console().print(table)
    Console().print(f"metrics: {json_out}\nreport:  {report_path}")


@toyworld_app.command("train")
def toyworld_train(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the model (out/model), classifier and log."),
    steps: int = setting(TRAINING, "steps"),
    batch: int = setting(TRAINING, "batch"),
    lr: float = setting(TRAINING, "lr"),
    seed: int = setting(TRAINING, "seed"),
    classifier_steps: int = setting(TRAINING, "classifier_steps"),
    world: ToyWorld = typer.Option(ToyWorld.minilm, help="minilm: frozen pretrained encoder (builtin:toyworld); clip: trained with the UNet (builtin:toyworld-clip); "
        "identities: 1,300 named identities on the frozen encoder (builtin:identities); "
        "mmdit: an SD 3-style joint-attention transformer on the frozen encoder, flow matching (the DiT benchmark's world)."),
    classifier: Path = typer.Option(
        None, exists=True, dir_okay=False,
        help="Reuse this trained classifier instead of training one (the two toy worlds draw the same scenes and share one; "
             "the identity world has its own)."
    ),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's)."),
) -> None:
    """Train the toy world's classifier, then its text-to-image model (resumes from out/checkpoint.pt)."""
    import torch

    from erasure.worlds.toyworld.accuracy import quick_accuracy
    from erasure.worlds.toyworld.classifier import held_out_accuracy, load_classifier, save_classifier, train_classifier
    from erasure.worlds.toyworld.train import train_toyworld

    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train.log", "a", buffering=1)

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")

    log(f"command: {' '.join(sys.argv)}")
    classifier_path = classifier or out / "classifier.safetensors"
    if world == ToyWorld.identities:  # its own judge: five heads, one per signature attribute
        from erasure.worlds.identities.accuracy import quick_identity_accuracy
        from erasure.worlds.identities.classifier import (
            identity_classifier_accuracy,
            load_identity_classifier,
            train_identity_classifier,
        )

        load, train, accuracy, quick = (
            load_identity_classifier, train_identity_classifier, identity_classifier_accuracy, quick_identity_accuracy,
        )
    else:
        load, train, accuracy, quick = load_classifier, train_classifier, held_out_accuracy, quick_accuracy
    if classifier_path.exists():
        classifier = load(classifier_path)
    else:
        classifier = train(steps=classifier_steps, seed=seed, log=log)
        save_classifier(classifier, classifier_path)
    log(f"classifier held-out accuracy: {accuracy(classifier)}")
    settings = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "log": log,
                "evaluate": lambda components: quick(components, classifier)}
    if world == ToyWorld.identities:
        from erasure.worlds.identities.train import train_identity_world

        train_identity_world(out, **settings)
    elif world == ToyWorld.mmdit:  # its sampler's own guidance (the UNet worlds' 1.5 is theirs)
        from erasure.worlds.toyworld.mmdit import GUIDANCE
        from erasure.worlds.toyworld.train_mmdit import train_mmdit

        settings["evaluate"] = lambda model: quick(model, classifier, guidance_scale=GUIDANCE)
        train_mmdit(out, **settings)
    else:
        train_toyworld(out, world=world.value, **settings)
    log(f"saved {out / 'model'}")


def _identity_accuracy(model: str, guidance: float, per_identity: int, json_out: Path | None) -> None:
    """Every identity of the identity world drawn from its name and alias (``per_identity`` prompts each)."""
    import json

    from rich.progress import Progress

    from erasure.loading import load_components
    from erasure.worlds.identities.accuracy import identity_accuracy
    from erasure.worlds.identities.classifier import load_identity_classifier

    components, classifier = load_components(model), load_identity_classifier()
    with Progress() as bar:
        task = bar.add_task("sampling every identity", total=None)
        result = identity_accuracy(components, classifier, per_identity=per_identity, guidance_scale=guidance,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table(title=f"identity world accuracy (%), {result['per_identity']} prompts per identity and word, cfg {guidance}")
    for column in ("by", "prompts shown", "identities drawn (>= 75 %)", *result["name"]["attributes"]):
        table.add_column(column)
    for group in ("name", "alias"):
        if group in result:
            r = result[group]
            table.add_row(group, f"{100 * r['prompts']:.1f}", f"{100 * r['identities_drawn']:.1f}",
                          *(f"{100 * v:.1f}" for v in r["attributes"].values()))
    Console().print(table)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1) + "\n")


@toyworld_app.command("accuracy")
def toyworld_accuracy(
    model: str = typer.Option(DEFAULT_MODEL, help=f"Toy-world model folder or {DEFAULT_MODEL}."),
    guidance: list[float] = typer.Option([TOY_SAMPLING.guidance_scale], help="Guidance scales to compare (repeatable)."),
    per_concept: int = typer.Option(16, help="Prompts per concept (each by name and by synonym); the identity world: per identity and word."),
    json_out: Path = typer.Option(None, "--json", help="Also write the tables to this file."),
    unseen_json: Path = typer.Option(
        None, help="Also measure the held-out words and write their accuracy and the drawable ones here."
    ),
    world: ToyWorld = typer.Option(None, help="The model's world when --model is a folder (identities: its own judge)."),
) -> None:
    """The classifier's accuracy on the model's samples, per shape, colour and style (the identity
    world: per identity, by name and by alias)."""
    import json

    from erasure.loading import load_components

    if world == ToyWorld.identities and model == DEFAULT_MODEL:
        model = "builtin:identities"  # the default model is the toy world's: measure the identity world's
    if model == "builtin:identities" or world == ToyWorld.identities:
        if unseen_json or len(guidance) > 1:
            raise typer.BadParameter("the identity world is measured at one --guidance and has no held-out words "
                                     "(its held-out aliases are trained); drop --unseen-json and extra --guidance values")
        return _identity_accuracy(model, guidance[0], per_concept, json_out)
    from erasure.worlds.toyworld.accuracy import concept_accuracy_table
    from erasure.worlds.toyworld.model import load_toyworld_classifier

    if world == ToyWorld.mmdit:  # the joint-attention world: its own folder layout and loader
        from erasure.worlds.toyworld.mmdit import load_mmdit_world

        components = load_mmdit_world(None if model == DEFAULT_MODEL else Path(model))
    else:
        components = load_components(model)
    classifier = load_toyworld_classifier()
    tables = {g: concept_accuracy_table(components, classifier, g, per_concept) for g in guidance}
    table = Table(
        title=f"toy model accuracy (%), {per_concept} prompts per concept and group, {TOY_SAMPLING.sampler_steps} sampler steps"
    )
    table.add_column("concept")
    for g in guidance:
        table.add_column(f"names, cfg {g}")
        table.add_column(f"synonyms, cfg {g}")
    first = tables[guidance[0]]
    for concept in list(first["names"]) + list(first["mean"]):
        group = "mean" if concept in first["mean"] else None
        cells = []
        for g in guidance:
            if group:
                cells += [f"{100 * tables[g]['mean'][concept]:.1f}", ""]
            else:
                cells += [f"{100 * tables[g]['names'][concept]:.1f}", f"{100 * tables[g]['synonyms'][concept]:.1f}"]
        table.add_row(concept, *cells)
    Console().print(table)
    if json_out:
        json_out.write_text(json.dumps({str(g): t for g, t in tables.items()}, indent=2))
    if unseen_json:
        from erasure.worlds.toyworld.accuracy import unseen_word_accuracy

        unseen = unseen_word_accuracy(components, classifier, guidance[0], per_concept)
        unseen_json.write_text(json.dumps(unseen, indent=2) + "\n")
        words = Table(title=f"held-out words (never in training), cfg {guidance[0]}: accuracy (%)")
        for column in ("concept", "word", "accuracy", "probe"):
            words.add_column(column)
        for value, accuracies in unseen["accuracy"].items():
            for word, accuracy in accuracies.items():
                words.add_row(value, word, f"{100 * accuracy:.1f}", "yes" if accuracy >= unseen["threshold"] else "no")
        Console().print(words)
