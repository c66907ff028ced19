"""Write the identity world's names and signatures (``erasure/assets/identities/identities.json``).

Names come from Faker's name and place lists (first names, surnames, countries, US states; several
locales), kept only when the word is one whole token of all-MiniLM-L6-v2's WordPiece vocabulary, so
the frozen encoder carries each as SD's CLIP carries a celebrity's name. Words of any prompt template,
generic person words and the toy world's own words are left out, and everyday English words unless
they are American names.

A name's signature is read from where the frozen encoder puts it, as a celebrity's face goes with how
CLIP embeds the name: each word's state (its token's, averaged over the world's templates) is
projected on the candidates' 11 leading principal components, and the signs of those (against their
medians; style: terciles) spell shape (3 components), colour (3), style (1), background (2) and frame
(2). Words are taken in a seeded order; a word becomes an identity when its signature is still free,
and a word whose signature is already an identity's becomes that identity's alias (a nickname drawn
the same way). A model can learn this in a CPU budget; signatures drawn at random were drawn at chance
after 2,500 training steps (``TRAINING.md``).

Faker is not a dependency: fetch its wheel once (``pip download --no-deps faker``), unzip it and
pass the folder. The committed file is what the world reads; this script only documents it.

    python scripts/identity_names.py --faker /tmp/faker-wheel --out erasure/assets/identities/identities.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import sys

import torch

COMMON_WORDS = 3000
LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "it_IT", "es_ES", "nl_NL", "sv_SE", "pl_PL", "pt_BR")


def faker_words(folder: str) -> tuple[list[str], set[str]]:
    """Every name and place word, and the American first and last names among them."""
    sys.path.insert(0, folder)
    words: list[str] = []
    american: set[str] = set()
    for locale in LOCALES:
        for module, fields in (
            ("person", ("last_names", "first_names_female", "first_names_male", "first_names")),
            ("address", ("countries", "states")),
        ):
            try:
                provider = importlib.import_module(f"faker.providers.{module}.{locale}").Provider
            except ImportError:
                continue
            for field in fields:
                values = getattr(provider, field, ())
                values = list(values.keys() if isinstance(values, dict) else values)
                words.extend(values)
                if locale == "en_US" and module == "person":
                    american.update(v.lower() for v in values)
    return words, american


def name_states(words: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """(n, d): each word's token state, averaged over ``templates``, normalised."""
    from erasure.core.prompts import fill
    from erasure.core.text import encode, tokenize
    from erasure.diffusion.models import packaged_encoder
    from erasure.worlds.toyworld.model import MINILM_PACKAGE

    encoder, tokenizer = packaged_encoder(MINILM_PACKAGE, "BertModel", 20)
    total = torch.zeros(len(words), encoder.config.hidden_size)
    for template in templates:
        ids, _ = tokenize(tokenizer, [fill(template, w) for w in words])
        states = encode(encoder.eval(), ids)
        word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(words))
        position = (ids == word_ids[:, None]).float().argmax(dim=1)
        total += states[torch.arange(len(words)), position]
    return torch.nn.functional.normalize(total / len(templates), dim=1)


def signature_of(components: torch.Tensor) -> list[dict]:
    """Signatures from whitened principal components (n, 11): signs against medians, style by terciles."""
    from erasure.worlds.identities.world import BACKGROUNDS, FRAMES
    from erasure.worlds.toyworld.world import COLOURS, SHAPES, STYLES

    bits = (components > components.median(dim=0).values).long()
    low, high = torch.quantile(components[:, 6], torch.tensor([1 / 3, 2 / 3]))
    style = (components[:, 6] > low).long() + (components[:, 6] > high).long()
    out = []
    for b, st in zip(bits.tolist(), style.tolist()):
        out.append({
            "shape": SHAPES[4 * b[0] + 2 * b[1] + b[2]], "colour": COLOURS[4 * b[3] + 2 * b[4] + b[5]], "style": STYLES[st],
            "background": tuple(BACKGROUNDS)[2 * b[7] + b[8]], "frame": tuple(FRAMES)[2 * b[9] + b[10]],
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faker", required=True, help="an unzipped faker wheel")
    parser.add_argument("--out", required=True)
    parser.add_argument("--identities", type=int, default=1300)
    parser.add_argument("--aliases", type=int, default=325, help="identities that get a second name")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from wordfreq import top_n_list

    from erasure.core.prompts import template_words
    from erasure.diffusion.models import packaged_encoder
    from erasure.worlds.identities.world import GENERIC_WORDS, WORLD_TEMPLATES
    from erasure.worlds.toyworld.model import MINILM_PACKAGE
    from erasure.worlds.toyworld.world import vocabulary

    _, tokenizer = packaged_encoder(MINILM_PACKAGE, "BertModel", 20)
    excluded = set(template_words()) | set(vocabulary()) | set(GENERIC_WORDS)
    words, american = faker_words(args.faker)
    # other locales' surnames include everyday English words ("real", "killer"); keep those only
    # when they are also American names ("rose", "grant")
    everyday = set(top_n_list("en", COMMON_WORDS))
    seen, names = set(), []
    for raw in words:
        word = raw.strip().lower()
        if not word.isascii() or not word.isalpha() or len(word) < 3 or word in seen or word in excluded:
            continue
        if word in everyday and word not in american:
            continue
        seen.add(word)
        if tokenizer.tokenize(word) == [word]:
            names.append(word)
    names.sort()
    random.Random(args.seed).shuffle(names)
    states = name_states(names, WORLD_TEMPLATES)
    centred = states - states.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = centred @ vh[:11].T
    codes = signature_of(components / components.std(dim=0))
    owner: dict[tuple, int] = {}  # signature -> index of its identity
    identities, spare = [], []
    for name, code in zip(names, codes):
        key = tuple(code.values())
        if key not in owner and len(identities) < args.identities:
            owner[key] = len(identities)
            identities.append({"name": name, "signature": code})
        elif key in owner:
            spare.append((name, owner[key]))
    if len(identities) < args.identities:
        raise SystemExit(f"only {len(identities)} distinct signatures among {len(names)} names; asked for {args.identities}")
    aliased = 0
    for name, index in spare:
        if aliased == args.aliases:
            break
        if "alias" not in identities[index]:
            identities[index]["alias"] = name
            # every other alias is never told to an erasure: the held-out probes of generality
            identities[index]["alias_held_out"] = aliased % 2 == 1
            aliased += 1
    with open(args.out, "w") as f:
        json.dump({"source": f"faker ({', '.join(LOCALES)}), one MiniLM token, seed {args.seed}",
                   "candidates": len(names), "identities": identities}, f, indent=1)
    print(f"{len(names)} one-token names; wrote {args.identities} identities, {aliased} with aliases")


if __name__ == "__main__":
    main()
