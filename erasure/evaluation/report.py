"""HTML erasure report: before/after image grids per concept first, numbers under them."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from erasure.diffusion.sampling import to_pil
from erasure.evaluation.metrics import percent

TILE = 64  # display size of one image; toy images are upscaled without smoothing


def image_grid(rows: list[list[torch.Tensor]], marks: list[list[bool | None]] | None = None, tile: int = TILE) -> Image.Image:
    """A grid of images; ``marks`` draws a green (judged to show the concept) or red frame."""
    height, width = len(rows), max(len(r) for r in rows)
    grid = Image.new("RGB", (width * (tile + 4), height * (tile + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            x, y = c * (tile + 4), r * (tile + 4)
            grid.paste(to_pil(image).resize((tile, tile), Image.NEAREST), (x + 2, y + 2))
            mark = marks[r][c] if marks else None
            if mark is not None:
                draw.rectangle([x, y, x + tile + 3, y + tile + 3], outline=(0, 160, 0) if mark else (200, 0, 0), width=2)
    return grid


def _png_data(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _fmt(value) -> str:
    return percent(value) if isinstance(value, float) else html.escape(str(value))


def _attack_section(attacks: dict) -> str:
    """Per concept and attack: what the attack draws from the base model (the control, top row)
    and from the erased model (bottom row)."""
    blocks = []
    for (concept, attack), shown in attacks.items():
        grid = image_grid(
            [list(shown["base_images"]), list(shown["erased_images"])],
            [list(shown["base_verdicts"]), list(shown["erased_verdicts"])],
        )
        blocks.append(
            f'<div class="concept"><h3>{html.escape(concept)}: {html.escape(attack)}</h3><img src="{_png_data(grid)}">'
            f'<p class="prompts">{html.escape(shown.get("prompt", ""))}</p></div>'
        )
    return "<h2>Attacks (top row: the base model attacked, the control; bottom row: the erased model attacked)</h2>" + "".join(blocks)


def write_report(
    evaluation, path: Path, title: str, details: dict | None = None, attacks: dict | None = None,
    aliases: dict[str, list[str]] | None = None,
) -> Path:
    """Write a self-contained HTML file (images embedded); ``attacks``: (concept, attack) ->
    {base_images, erased_images, base_verdicts, erased_verdicts, prompt}; ``aliases``: concept ->
    the alias phrases discovery found in the base model and erased with it."""
    probes = evaluation.probes
    sections = []
    for group_title, groups, _role in (
        ("Erased concepts: their names (top row before, bottom row after)", ("erased",), "erased"),
        ("Erased concepts: trained synonyms and paraphrases", ("synonym",), "erased"),
        ("Erased compound concepts: their words in another order or apart", ("phrasing",), "erased"),
        ("Erased concepts: words never seen in training", ("unseen",), "erased"),
        ("Retained concepts", ("retained",), "retained"),
    ):
        concepts = list(dict.fromkeys(p.concept for p in probes if p.group in groups))
        blocks = []
        for concept in concepts:
            index = [i for i, p in enumerate(probes) if p.group in groups and p.concept == concept]
            grid = image_grid(
                [[evaluation.base_images[i] for i in index], [evaluation.erased_images[i] for i in index]],
                [[evaluation.base_verdicts[i] for i in index], [evaluation.erased_verdicts[i] for i in index]],
            )
            prompts = "<br>".join(html.escape(probes[i].prompt) for i in index[:4]) + ("<br>…" if len(index) > 4 else "")
            blocks.append(
                f'<div class="concept"><h3>{html.escape(concept)}</h3><img src="{_png_data(grid)}">'
                f'<p class="prompts">{prompts}</p></div>'
            )
        if blocks:
            sections.append(f"<h2>{group_title}</h2>" + "".join(blocks))
    if attacks:
        sections.append(_attack_section(attacks))

    if aliases:
        items = "".join(
            f"<li><b>{html.escape(name)}</b>: {html.escape(', '.join(found)) if found else 'none found'}</li>"
            for name, found in aliases.items()
        )
        sections.append(
            "<h2>Aliases found in the base model (erased with their concept)</h2><ul>" + items + "</ul>"
            "<p>Exclude one with the concept's <code>exclude_aliases</code> in the request.</p>"
        )

    names = ("acc_e", "acc_g", "acc_g_unseen", "acc_s", "h_o", "h_c", "anchor_fidelity")
    summary = "<tr><th></th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
    summary += "<tr><td>base</td>" + "".join(f"<td>{_fmt(evaluation.base_metrics.get(n, float('nan')))}</td>" for n in names) + "</tr>"
    summary += "<tr><td>erased</td>" + "".join(f"<td>{_fmt(evaluation.metrics.get(n, float('nan')))}</td>" for n in names) + "</tr>"
    rows = "".join(
        f"<tr><td>{html.escape(r['concept'])}</td><td>{r['role']}</td>"
        + "".join(f"<td>{_fmt(r.get(f'base_{k}', float('nan')))} → {_fmt(r.get(k, float('nan')))}</td>" for k in ("acc_e", "acc_g", "acc_g_unseen", "acc_s"))
        + f"<td>{_fmt(r.get('anchor_fidelity', float('nan')))}</td></tr>"
        for r in evaluation.concepts
    )
    extra = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in (details or {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} .concept{{display:inline-block;margin:0 1.5em 1.5em 0;vertical-align:top}}
.prompts{{font-size:80%;color:#555}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Each grid: the base model (top row) and the erased model (bottom row) on the same prompts and seeds.
A green frame: the judge sees the concept the prompt names; red: it does not.</p>
{''.join(sections)}
<h2>Numbers (accuracies in %)</h2><table>{summary}</table>
<p>acc_e: erased concepts drawn from their names (lower is better); acc_g: from trained synonyms and paraphrases, and
compound concepts' words in other orders (lower is better);
acc_g_unseen: from real synonyms the model never saw in training but draws (lower is better; – when the world has none);
acc_s: retained concepts drawn correctly (higher is better); h_o = 3 / (1/(1-acc_e) + 1/acc_s + 1/(1-acc_g));
h_c = 2 / (1/(1-acc_e) + 1/acc_s) (the celebrity benchmark's);
anchor_fidelity: the erased concepts' images that show the anchor the request chose (higher is better; – when the judge cannot see it).
Pixel drift of retained prompts: {evaluation.metrics['pixel_drift']:.4f}; unconditional prediction drift: {evaluation.metrics['unconditional_drift']:.4f}.</p>
<h2>Per concept (base → erased, %)</h2><table><tr><th>concept</th><th>role</th><th>acc_e</th><th>acc_g</th><th>acc_g_unseen</th><th>acc_s</th><th>anchor fidelity (erased)</th></tr>{rows}</table>
<ul>{extra}</ul></body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
