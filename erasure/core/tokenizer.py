"""A small CLIP-format BPE tokenizer built from a word list.

Our own models (the tiny test pipeline, the toy world) cannot download CLIP's
vocabulary, so we learn a byte-level BPE on the words they use. Every listed word becomes a single token (``red</w>``); any other
text still tokenises, letter by letter, because every byte and byte+``</w>`` is in
the vocabulary. BOS/EOS/padding follow CLIP: ``<|startoftext|>``, and
``<|endoftext|>`` for both end and padding.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


# Words our tiny test models' vocabularies hold beyond the templates' (objects, styles, explicit words).
TINY_EXTRA_WORDS = (
    "cat dog car tree house church parachute truck horse bird boat plane ship apple "
    "monet picasso gogh van nude naked clothes cup chair table"
).split()


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE on a word list until every word is one symbol.

    Ties between equally frequent pairs break by the pair's text, so the same
    words always give the same merges (the ``tokenizers`` trainer breaks ties in
    hash order, which changes from run to run and would change our models'
    fingerprints).
    """
    words_as_symbols = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges = []
    while True:
        counts: Counter = Counter()
        for symbols in words_as_symbols:
            counts.update(zip(symbols, symbols[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        updated = []
        for symbols in words_as_symbols:
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            updated.append(tuple(out))
        words_as_symbols = updated


def build_clip_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose BPE makes every word of ``words`` (lower case) one token."""
    words = sorted({w.lower() for w in words if w.strip()})
    merges = learn_merges(words)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for char in sorted(ByteLevel.alphabet()):
        for symbol in (char, char + "</w>"):
            vocab.setdefault(symbol, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_clip_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Save with ``save_pretrained`` and also as CLIP's ``vocab.json`` + ``merges.txt``."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = ["#version: 0.2"] + [" ".join(pair) if isinstance(pair, list) else pair for pair in state["merges"]]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")


def build_wordpiece_tokenizer(words: list[str], style: str = "bert", model_max_length: int = 16):
    """A small WordPiece tokenizer over ``words`` for our tiny test models, in BERT's layout
    (``[CLS] ... [SEP] [PAD]``) or T5's (no start token, ``... </s> <pad>``). Each word is one
    token except those listed as ``"kit ##ty"`` (then it is those pieces), so tests see
    concepts made of several word pieces; unknown words become the unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style == "bert":
        specials = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]"}
    elif style == "t5":
        specials = {"pad": "<pad>", "unk": "<unk>", "sep": "</s>"}
    else:
        raise ValueError(f"style must be 'bert' or 't5', not {style!r}")
    pieces = [p for w in words for p in w.split()]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials.values(), *pieces]))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=specials["unk"]))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    sep = (specials["sep"], vocab[specials["sep"]])
    if style == "bert":
        cls = (specials["cls"], vocab[specials["cls"]])
        tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[cls, sep])
    else:
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[sep])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        pad_token=specials["pad"],
        unk_token=specials["unk"],
        **({"cls_token": specials["cls"], "sep_token": specials["sep"]} if style == "bert" else {"eos_token": specials["sep"]}),
    )
