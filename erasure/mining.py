"""RealEra's neighbour mining: erase what lies near a concept, keep what lies beyond it.

"Concept residue": after an erasure, inputs *near* the concept (a synonym the request did
not list, a paraphrase) still evoke it. Mining adds, per concept (docs/method.md,
"Neighbour mining"):

- perturbed states ``e' = |e| (cos t e/|e| + sin t u)``, ``u`` a random unit direction
  orthogonal to ``e`` and ``cos t`` uniform in the band ``[low, high]``: the same norm, a
  chosen angle. They join the concept's states, so the fusion maps them as it maps the
  concept's (its CFR map and LoRA);
- beyond-concept states, built the same way with ``cos t`` uniform in ``[0, low)``: they
  join the prior, so the edit must keep them, and the neighbourhood stays a neighbourhood;
- text neighbours: words of the tokenizer's vocabulary whose state, in the concept's own
  prompt, has a cosine to the concept's state inside the band. Their prompts join the
  concept's. Retained concepts, anchors and the template's own words are never mined.

Perturbations act on the concept's own token states (its span in each prompt), the states a
bidirectional encoder and a causal one both carry the concept in.
"""

from __future__ import annotations

import re

import torch

from erasure.text import encode, tokenize


def states_at_cosine(states: torch.Tensor, low: float, high: float, per_state: int, generator: torch.Generator) -> torch.Tensor:
    """(n * per_state, d): copies of ``states`` (n, d) with the same norm and a cosine to their
    origin drawn uniformly in ``[low, high]``."""
    if per_state == 0 or len(states) == 0:
        return states.new_zeros(0, states.shape[1])
    origin = states.repeat_interleave(per_state, dim=0).double()
    unit = origin / origin.norm(dim=1, keepdim=True).clamp_min(1e-12)
    noise = torch.randn(origin.shape, generator=generator, dtype=torch.float64)
    orthogonal = noise - (noise * unit).sum(dim=1, keepdim=True) * unit
    orthogonal = orthogonal / orthogonal.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = low + (high - low) * torch.rand(len(origin), 1, generator=generator, dtype=torch.float64)
    sine = (1 - cosine**2).clamp_min(0).sqrt()
    return (origin.norm(dim=1, keepdim=True) * (cosine * unit + sine * orthogonal)).to(states.dtype)


def candidate_words(tokenizer, limit: int = 4000) -> list[str]:
    """Whole alphabetic words of the tokenizer's vocabulary (no sub-word pieces, no special
    tokens), in vocabulary order, at most ``limit``: where text neighbours are looked for.
    A BPE vocabulary (CLIP) marks a word's end with ``</w>``; WordPiece marks a piece with ``##``."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    word_end = any(token.endswith("</w>") for token, _ in vocabulary)
    special = set(tokenizer.all_special_tokens)
    words = []
    for token, _ in vocabulary:
        if token in special or token.startswith("##") or (word_end and not token.endswith("</w>")):
            continue
        word = token.removesuffix("</w>")
        if re.fullmatch(r"[a-z]{3,}", word):
            words.append(word)
            if len(words) >= limit:
                break
    return words


def text_neighbours(
    components,
    template: str,
    concept_state: torch.Tensor,
    band: tuple[float, float],
    count: int,
    exclude: set[str],
    candidates: list[str],
) -> list[tuple[str, float]]:
    """The ``count`` candidate words whose state in ``template`` (the word at its end, as the
    concept's) lies in the cosine band of ``concept_state``, closest first, with their cosine."""
    words = [w for w in candidates if w not in exclude]
    if not words or count == 0:
        return []
    prompts = [template.replace("{}", w) for w in words]
    ids, lengths = tokenize(components.tokenizer, prompts)
    states = encode(components.text_encoder, ids)
    last = states[torch.arange(len(words)), (lengths - 2).clamp_min(0)]  # the word's last token, before EOS
    cosine = torch.nn.functional.cosine_similarity(last.double(), concept_state.double()[None], dim=1)
    inside = [(words[i], float(cosine[i])) for i in torch.argsort(cosine, descending=True).tolist()
              if band[0] <= float(cosine[i]) <= band[1]]
    return inside[:count]
