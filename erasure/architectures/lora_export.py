"""The erasure as a LoRA: the fused edit's weight deltas as low-rank factors that a served
pipeline loads with diffusers' ``load_lora_weights`` and drops with ``unload_lora_weights``,
so no new base weights are shipped.

Each edited map's delta ``W_erased - W_base`` is factored by SVD, ``delta ~ B A`` with the
fewest singular values that hold ``energy`` of its squared Frobenius norm; the relative
reconstruction error ``|delta - B A|_F / |delta|_F`` of every map is reported beside it, so
an operator sees what the approximation costs before serving it. The factors are written in
the diffusers (PEFT) layout: ``<denoiser>.<module>.lora_A.weight`` (A) and ``.lora_B.weight``
(B), with no alpha (PEFT then scales by 1).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from erasure.architectures.base import Architecture, module_at
from erasure.spec import RequestError
from erasure.staging import make_staging, remove_stale_staging

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for
REPORT_FILE = "erasure_lora.json"


@dataclass(frozen=True)
class MapFactors:
    module: str
    rank: int
    relative_error: float  # |delta - B A|_F / |delta|_F


def check_energy(energy: float) -> None:
    if not 0.0 < energy <= 1.0:  # NaN fails too
        raise RequestError(f"energy {energy} must be in (0, 1]: the share of the edit's squared norm the LoRA keeps")


def check_same_base(base_pipe, erased_pipe, architecture: Architecture) -> None:
    """Refuse an erased pipeline that differs from ``base_pipe`` anywhere an erasure does not edit:
    it was made from another base, and a LoRA of the difference would paste that base's maps on
    this one. The edited maps' other columns (SDXL's size conditioning) count as not edited."""
    edited = {m.module: m for stream in architecture.streams(base_pipe) for m in stream.maps}
    differing = []
    for name, component in base_pipe.components.items():
        other = erased_pipe.components.get(name)
        if not isinstance(component, torch.nn.Module) or not isinstance(other, torch.nn.Module):
            continue  # a part one side does not ship (SD's safety checker) is not the erasure's
        theirs = other.state_dict()
        for key, tensor in component.state_dict().items():
            module = key.removesuffix(".weight")
            if name == architecture.denoiser_name and module in edited and key.endswith(".weight"):
                columns = edited[module].columns
                if columns is None:
                    continue
                tensor = torch.cat([tensor[:, : columns[0]], tensor[:, columns[1] :]], dim=1)
                mine = theirs.get(key)
                theirs_kept = None if mine is None else torch.cat([mine[:, : columns[0]], mine[:, columns[1] :]], dim=1)
            else:
                theirs_kept = theirs.get(key)
            if theirs_kept is None or not _same(theirs_kept, tensor):
                differing.append(f"{name}.{key}")
    if differing:
        raise RequestError(
            f"the erased model differs from the base outside the maps an erasure edits ({len(differing)} tensors, e.g. "
            f"{', '.join(differing[:3])}): it was not made from this base; give export-lora the erased model's own base"
        )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, or equal once rounded to a half-precision dtype in which one of them is held exactly
    (a base read in float32 against an erasure made in bfloat16 is the same base)."""
    if a.shape != b.shape:
        return False
    if torch.equal(a, b.to(a.dtype)):
        return True
    if not (a.is_floating_point() and b.is_floating_point()):
        return False
    for coarse in (torch.bfloat16, torch.float16):
        held = any(torch.equal(t, t.to(coarse).to(t.dtype)) for t in (a, b))
        if held and torch.equal(a.to(coarse), b.to(coarse)):
            return True
    return False


def low_rank_factors(delta: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, relative error) with ``B A`` the best approximation of ``delta`` (d_out x d_in) of the
    smallest rank whose singular values hold ``energy`` of ``|delta|_F^2``."""
    check_energy(energy)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    held = torch.cumsum(s**2, 0) / (s**2).sum()
    rank = min(int((held < energy - 1e-12).sum()) + 1, len(s))
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    error = float(torch.linalg.matrix_norm(delta.double() - up @ down) / torch.linalg.matrix_norm(delta.double()))
    return up.to(delta.dtype), down.to(delta.dtype), error


def export_lora(base_pipe, erased_pipe, architecture: Architecture, folder: Path, energy: float = 0.999) -> list[MapFactors]:
    """Write the edit that turns ``base_pipe`` into ``erased_pipe`` (same family, same base) as a
    LoRA folder: the weights and ``erasure_lora.json`` (rank and error per map). The folder appears
    whole or not at all."""
    if not architecture.supports_lora_loading:
        raise RequestError(
            f"{architecture.family}: diffusers has no load_lora_weights for {type(base_pipe).__name__}, so a LoRA "
            "export could not be applied; ship the erased pipeline folder instead"
        )
    check_energy(energy)
    folder = Path(folder)
    if folder.exists():
        raise RequestError(f"{folder} exists; choose a new folder for the LoRA (nothing is overwritten)")
    check_same_base(base_pipe, erased_pipe, architecture)
    base, erased = architecture.denoiser(base_pipe), architecture.denoiser(erased_pipe)
    layers, report = {}, []
    for stream in architecture.streams(base_pipe):
        for edited in stream.maps:
            before, after = module_at(base, edited.module).weight, module_at(erased, edited.module).weight
            if before.shape != after.shape:
                raise RequestError(f"{edited.module}: the two pipelines differ in shape; export from the erased model's own base")
            delta = (after.detach().float() - before.detach().float()).cpu()
            if not delta.abs().max() > 0:
                continue
            up, down, error = low_rank_factors(delta, energy)
            layers[f"{edited.module}.lora_A.weight"] = down.contiguous()
            layers[f"{edited.module}.lora_B.weight"] = up.contiguous()
            report.append(MapFactors(edited.module, down.shape[0], error))
    if not layers:
        raise RequestError("the two pipelines have the same weights in every edited map: there is no edit to export")
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(folder.parent, folder.name)  # a killed export's
    staging = make_staging(folder.parent, folder.name)
    try:
        type(base_pipe).save_lora_weights(staging, **{f"{architecture.denoiser_name}_lora_layers": layers})
        summary = {
            "family": architecture.family,
            "energy": energy,
            "maps": [asdict(m) for m in report],
            "max_relative_error": max(m.relative_error for m in report),
            "parameters": sum(t.numel() for t in layers.values()),
        }
        (staging / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        try:
            staging.rename(folder)  # refuses a folder that appeared meanwhile: nothing is overwritten
        except OSError:
            raise RequestError(f"{folder} appeared while the LoRA was written; choose a new folder") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
