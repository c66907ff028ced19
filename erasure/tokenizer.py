"""A small CLIP-format BPE tokenizer built from a word list.

Our own models (the tiny test pipeline, the toy world) cannot download CLIP's
vocabulary, so we train a byte-level BPE with the ``tokenizers`` library on the
words they use. Every listed word becomes a single token (``red</w>``); any other
text still tokenises, letter by letter, because every byte and byte+``</w>`` is in
the vocabulary. BOS/EOS/padding follow CLIP: ``<|startoftext|>``, and
``<|endoftext|>`` for both end and padding.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def build_clip_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """Train a BPE on ``words`` (lower case) and wrap it as a ``CLIPTokenizer``."""
    words = sorted({w.lower() for w in words if w.strip()})
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # never the limit: training stops when every word is one token
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        initial_alphabet=ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    bpe.train_from_iterator(words, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for char in sorted(ByteLevel.alphabet()):
        for symbol in (char, char + "</w>"):
            vocab.setdefault(symbol, len(vocab))
    merges = [tuple(pair) for pair in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_clip_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Save with ``save_pretrained`` and also as CLIP's ``vocab.json`` + ``merges.txt``."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = ["#version: 0.2"] + [" ".join(pair) if isinstance(pair, list) else pair for pair in state["merges"]]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
