"""The built-in emoji benchmark (shared/BENCHMARK.md): Twemoji images, CLDR text.

Two pinned npm packages, fetched with `npm pack`, checked against their
published sha512 integrity and unpacked into a cache folder. Items are the
emoji that have a Twemoji image and an emojibase entry (hexcode matched with
FE0F removed; skin-tone variants are not top-level entries, so they stay out).
Training texts are the English CLDR tags, one per tag plus all tags joined;
held-out query set A is the English label, set B the GitHub, iamcal and
joypixels shortcodes that differ from the label and every tag.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from cart.errors import CartError

PACKAGES = {
    # name@version: the registry's dist.integrity for that tarball
    "emoji-datasource-twitter@16.0.0": "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    "emojibase-data@17.0.0": "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
}
# Only these parts of each tarball are unpacked (the sprite sheets alone are 50 MB).
KEEP = ("package/emoji.json", "package/img/twitter/64/", "package/en/data.json", "package/en/shortcodes/")
SHORTCODE_SETS = ("github", "iamcal", "joypixels")
TEXT_SOURCE = "Twemoji artwork (c) Twitter/X, CC-BY 4.0; text from Unicode CLDR via emojibase-data (MIT)"


def fetch_packages(cache_dir: str | Path) -> dict[str, Path]:
    """Return {package name: unpacked folder}, fetching and verifying whatever the cache lacks."""
    cache = Path(cache_dir).expanduser()
    folders = {}
    for spec, integrity in PACKAGES.items():
        folder = cache / spec.replace("@", "-")
        if not folder.is_dir():
            _fetch(spec, integrity, folder)
        folders[spec.split("@")[0]] = folder / "package"
    return folders


def _fetch(spec: str, integrity: str, folder: Path) -> None:
    if shutil.which("npm") is None:
        raise CartError("npm not found: the emoji data comes from the npm registry; install Node.js and npm")
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
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(KEEP)]
            tar.extractall(unpacked, members=members, filter="data")
        unpacked.rename(folder)  # atomic: the cache holds a whole package or nothing


def load_items(cache_dir: str | Path) -> list[dict]:
    """The 1,911 emoji as corpus records (see cart.corpus for the record format)."""
    folders = fetch_packages(cache_dir)
    images, text = folders["emoji-datasource-twitter"], folders["emojibase-data"]
    emojibase = {
        entry["hexcode"].upper().replace("-FE0F", ""): entry
        for entry in json.loads((text / "en/data.json").read_text(encoding="utf-8"))
    }
    shortcodes = {
        name: json.loads((text / f"en/shortcodes/{name}.json").read_text(encoding="utf-8"))
        for name in SHORTCODE_SETS
    }
    items = []
    for emoji in json.loads((images / "emoji.json").read_text(encoding="utf-8")):
        entry = emojibase.get(emoji["unified"].upper().replace("-FE0F", ""))
        if not emoji.get("has_img_twitter") or entry is None:
            continue
        label, tags = entry["label"], entry.get("tags", [])
        captions = list(dict.fromkeys(tags + [" ".join(tags)]))
        seen = {label.lower(), *(t.lower() for t in tags)}
        set_b = []
        for name in SHORTCODE_SETS:
            codes = shortcodes[name].get(entry["hexcode"], [])
            for code in [codes] if isinstance(codes, str) else codes:
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
            + [{"text": q, "kind": "query", "set": "B"} for q in set_b],
            "meta": {"label": label, "tags": tags, "emoji": entry["emoji"]},
        })
    return items
