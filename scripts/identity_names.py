"""Write the identity world's names (``erasure/assets/identities/identities.json``): how it was made.

Names come from Faker's name and place lists (first names, surnames, countries, US states; several
locales), kept only when the word is one whole token of all-MiniLM-L6-v2's WordPiece vocabulary, so
the frozen encoder carries each as SD's CLIP carries a celebrity's name. Words of any prompt template,
generic person words and the toy world's own words are left out. The list is shuffled with a seed;
the first ``--identities`` become identities, each with a distinct visual signature, and the next
words become aliases (nicknames) of some of them.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faker", required=True, help="an unzipped faker wheel")
    parser.add_argument("--out", required=True)
    parser.add_argument("--identities", type=int, default=1300)
    parser.add_argument("--aliases", type=int, default=325, help="identities that get a second name")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from wordfreq import top_n_list

    from erasure.core.prompts import template_words
    from erasure.diffusion.models import packaged_encoder
    from erasure.worlds.identities.world import GENERIC_WORDS, signatures
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
    needed = args.identities + args.aliases
    if len(names) < needed:
        raise SystemExit(f"only {len(names)} one-token names; asked for {needed}")
    codes = signatures(args.identities, args.seed)
    identities = [{"name": names[i], "signature": codes[i]} for i in range(args.identities)]
    for offset, index in enumerate(random.Random(args.seed + 1).sample(range(args.identities), args.aliases)):
        identities[index]["alias"] = names[args.identities + offset]
        # every other alias is never told to an erasure: the held-out probes of generality
        identities[index]["alias_held_out"] = offset % 2 == 1
    with open(args.out, "w") as f:
        json.dump({"source": f"faker ({', '.join(LOCALES)}), one MiniLM token, seed {args.seed}",
                   "candidates": len(names), "identities": identities}, f, indent=1)
    print(f"{len(names)} one-token names; wrote {args.identities} identities, {args.aliases} with aliases")


if __name__ == "__main__":
    main()
