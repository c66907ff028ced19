"""Reading the UNet's cross-attention: projections, and attention probabilities of chosen tokens.

``CrossAttentionProbe`` replaces the processor of every ``attn2`` (text
cross-attention) module. It computes attention exactly as diffusers'
``AttnProcessor`` does, but with the probabilities in hand, and gives those of
the selected token positions to a listener: the mask builder (no gradient, many
steps) or the LoRA loss (with gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

# listener(layer_name, probs): probs is (batch, heads, pixels, selected tokens)
Listener = Callable[[str, torch.Tensor], None]


def cross_attention_projections(unet) -> dict[str, torch.nn.Linear]:
    """Every cross-attention key and value projection, by module name (``...attn2.to_k``)."""
    found = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            found[name] = module.base_layer if hasattr(module, "base_layer") else module
    if not found:
        raise ValueError("the UNet has no cross-attention (attn2.to_k / attn2.to_v) to erase from")
    return found


class CrossAttentionProbe:
    """Attention processor for ``attn2`` that reports probabilities of ``token_index`` positions.

    ``token_index``: (batch, k) long tensor of token positions per sample, or None
    to report nothing. ``batch_slice`` picks the samples reported (the
    conditional half under classifier-free guidance).
    """

    def __init__(self, name: str, probe: ProbeState):
        self.name = name
        self.probe = probe

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attn.group_norm is not None:
            return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, pixels, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch*heads, pixels, tokens)
        if self.probe.listener is not None and self.probe.token_index is not None:
            per_head = probs.view(batch, attn.heads, pixels, -1)[self.probe.batch_slice]
            index = self.probe.token_index.to(per_head.device)  # (b, k)
            index = index[:, None, None, :].expand(-1, attn.heads, pixels, -1)
            self.probe.listener(self.name, per_head.gather(3, index))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class ProbeState:
    def __init__(self):
        self.listener: Listener | None = None
        self.token_index: torch.Tensor | None = None
        self.batch_slice = slice(None)


@contextmanager
def probing(unet):
    """Probe every ``attn2`` of ``unet`` while the block runs; yields the state that steers the probes."""
    previous = unet.attn_processors
    state = ProbeState()
    unet.set_attn_processor(
        {name: CrossAttentionProbe(name, state) if ".attn2." in name else p for name, p in previous.items()}
    )
    try:
        yield state
    finally:
        unet.set_attn_processor(previous)


def resize_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """(b, H, W) float mask -> (b, pixels) bool at a layer's square resolution (nearest, > 0.5)."""
    side = int(math.isqrt(pixels))
    if side * side != pixels:
        raise ValueError(f"cannot map a mask to a non-square attention map of {pixels} pixels")
    resized = F.interpolate(mask[:, None].float(), size=(side, side), mode="nearest")[:, 0]
    return (resized > 0.5).reshape(len(mask), -1)


class AttentionMapAccumulator:
    """Listener that sums, over layers and steps, the head-averaged maps of the selected tokens.

    ``maps()`` returns (batch, size, size) at the finest resolution seen.
    """

    def __init__(self, size: int):
        self.size = size
        self.total: torch.Tensor | None = None

    def __call__(self, name: str, probs: torch.Tensor) -> None:
        batch, _, pixels, _ = probs.shape
        side = int(math.isqrt(pixels))
        layer_map = probs.detach().float().mean(dim=1).sum(dim=-1).reshape(batch, 1, side, side)
        layer_map = F.interpolate(layer_map, size=(self.size, self.size), mode="bilinear", align_corners=False)[:, 0]
        self.total = layer_map.cpu() if self.total is None else self.total + layer_map.cpu()

    def maps(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no cross-attention was recorded")
        return self.total
