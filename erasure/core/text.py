"""Text-encoder states, and token alignment between a concept prompt and its anchor prompt.

A prompt is ``[BOS, prefix..., concept..., suffix..., EOS, pad...]`` padded to
``L`` tokens (CLIP: ``<|startoftext|>``/``<|endoftext|>``; BERT-like: ``[CLS]``/
``[SEP]``/``[PAD]``; T5: no BOS, ``</s>``, ``<pad>``); a concept may be several
tokens (word pieces). Replacing the concept with its anchor changes the span in the
middle (possibly to a different number of tokens). CFR needs, for every token
*after* the concept, the state at the matching position in the anchor prompt:

- prefix tokens match position for position (a causal encoder makes their
  states identical: identity rows; a bidirectional one does not, so there they
  are real targets: the prefix too has seen the concept);
- suffix tokens and EOS match counted from the end of the real tokens;
- padding matches counted from the end of the sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenAlignment:
    """Positions in a concept prompt (``concept``) and its anchor prompt (``anchor``).

    ``concept_span``: the concept's own token positions (trained by the LoRA).
    ``pairs``: (position in concept prompt, position in anchor prompt) for every
    token whose state CFR maps, prefix included.
    """

    concept_span: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]
    anchor_span: tuple[int, ...] = ()  # the anchor's own positions in the anchor prompt (see align_tokens)

    def with_concept_tokens(self, which: str) -> TokenAlignment:
        """The alignment with the concept's own tokens paired with the anchor's too: ``"after"``
        none (MACE: left to the LoRA), ``"last"`` its last token with the anchor's last, ``"span"``
        every token with the anchor token at the same relative place. In a causal encoder the
        earlier tokens of a compound concept are shared with every prompt that starts the same
        way, so editing them moves those prompts too."""
        if which == "after" or not self.concept_span or not self.anchor_span:
            return self
        if which == "last":
            extra = [(self.concept_span[-1], self.anchor_span[-1])]
        elif which == "span":
            n, m = len(self.concept_span), len(self.anchor_span)
            extra = [(p, self.anchor_span[min(i * m // n, m - 1)]) for i, p in enumerate(self.concept_span)]
        else:
            raise ValueError(f"edit_tokens {which!r}: use 'after', 'last' or 'span'")
        return dataclasses.replace(self, pairs=tuple(sorted(set(self.pairs) | set(extra))))


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and real lengths (BOS and EOS included), padded to ``max_length`` (the tokenizer's
    own when None; T5 in SD 3 and FLUX is padded to the pipeline's ``max_sequence_length``)."""
    batch = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return batch["input_ids"], batch["attention_mask"].sum(dim=1)


def align_tokens(concept_ids: list[int], concept_len: int, anchor_ids: list[int], anchor_len: int) -> TokenAlignment:
    """Align one concept prompt with its anchor prompt (see the module docstring)."""
    length = len(concept_ids)
    if len(anchor_ids) != length:
        raise ValueError("concept and anchor prompts must be padded to the same length")
    prefix = 0
    while prefix < min(concept_len, anchor_len) and concept_ids[prefix] == anchor_ids[prefix]:
        prefix += 1
    suffix = 0
    limit = min(concept_len, anchor_len) - prefix
    while suffix < limit and concept_ids[concept_len - 1 - suffix] == anchor_ids[anchor_len - 1 - suffix]:
        suffix += 1
    span = tuple(range(prefix, concept_len - suffix))
    pairs = [(i, i) for i in range(prefix)]
    pairs += [(concept_len - suffix + k, anchor_len - suffix + k) for k in range(suffix)]
    pads = min(length - concept_len, length - anchor_len)
    pairs += [(length - pads + k, length - pads + k) for k in range(pads)]
    # an anchor that is the concept's last words ("car" for "white car") has no span of its own:
    # the concept's words then pair with the first of them, the anchor's head
    anchor_span = tuple(range(prefix, anchor_len - suffix)) or ((prefix,) if prefix < anchor_len else ())
    return TokenAlignment(concept_span=span, pairs=tuple(pairs), anchor_span=anchor_span)


def encoder_states(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states of one batch, (n, L, d), with gradients if the encoder has them.

    CLIP reads the padded ids as they are (as SD 1.x/2.x do: its causal mask keeps padding
    out of the real tokens' states). A bidirectional encoder (BERT-like, T5) gets an
    attention mask over its padding, else every state would depend on how much padding
    the prompt has."""
    if text_encoder.config.model_type.startswith("clip"):
        return text_encoder(ids)[0]
    mask = (ids != text_encoder.config.pad_token_id).long()
    return text_encoder(input_ids=ids, attention_mask=mask)[0]


@torch.no_grad()
def encode(text_encoder, ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Last hidden states (what the UNet's cross-attention reads): (n, L, d)."""
    device = text_encoder.device
    chunks = [encoder_states(text_encoder, ids[i : i + batch_size].to(device)).float() for i in range(0, len(ids), batch_size)]
    return torch.cat(chunks).cpu() if chunks else torch.empty(0)


def encode_prompts(components, prompts: list[str]) -> torch.Tensor:
    ids, _ = tokenize(components.tokenizer, prompts)
    return encode(components.text_encoder, ids)


def empty_prompt_states(components) -> torch.Tensor:
    """(L, d) float64: the states of "", which the unconditional prediction reads."""
    return encode_prompts(components, [""])[0].double()
