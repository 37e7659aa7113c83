"""Reading a dataset source into checked corpus records, for `cart corpus` (which writes them) and `cart add`
(which adds them to a trained run): the built-in emoji set, a Karpathy-split JSON (`dataset_flickr30k.json`,
`dataset_coco.json`), a COCO captions JSON, a JSONL or CSV manifest, a folder of media. The records' shape and
text kinds are `corpus.jsonl`'s (cart/data/corpus.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections import Counter
from pathlib import Path

import filetype
from PIL import Image
from tqdm import tqdm

from cart.data import emoji
from cart.errors import CartError
from cart.settings import CorpusConfig

MODALITIES = ("image", "audio", "video")
EXTENSIONS = {
    **dict.fromkeys((".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"), "image"),
    **dict.fromkeys((".wav", ".flac", ".mp3", ".ogg", ".m4a"), "audio"),
    **dict.fromkeys((".mp4", ".avi", ".mkv", ".mov", ".webm"), "video"),
}
MANIFEST_COLUMNS = ("id", "modality", "path", "texts", "split")
REQUIRED_COLUMNS = ("id", "path", "texts")
KINDS = ("caption", "generated", "query", "validation")


class BadItem(Exception):
    """One item that cannot enter the corpus; the message says why."""


def expanded(corpus_cfg: CorpusConfig) -> CorpusConfig:
    """The settings with `~` in its paths expanded."""
    return dataclasses.replace(corpus_cfg, path=os.path.expanduser(corpus_cfg.path),
                               media_root=os.path.expanduser(corpus_cfg.media_root))


def read_source(corpus_cfg: CorpusConfig, seen: dict[str, str] | None = None) -> tuple[list[dict], list[str]]:
    """Every item of the source `corpus_cfg` names, checked (`corpus.on_bad`: the first bad one stops it
    with a one-line error naming where it is, or is skipped and reported), and the skipped ones. `seen`:
    item ids already taken (id -> where), which a new item may not reuse."""
    sources = {"emoji": _emoji, "karpathy": _karpathy, "coco": _coco, "manifest": _manifest, "folder": _folder}
    if corpus_cfg.source != "emoji" and not corpus_cfg.path:
        raise CartError(f"corpus.path is required for corpus.source={corpus_cfg.source}")
    if corpus_cfg.path and not Path(corpus_cfg.path).exists():
        raise CartError(f"corpus.path not found: {corpus_cfg.path}")
    if corpus_cfg.source == "folder" and not Path(corpus_cfg.path).is_dir():
        raise CartError(f"corpus.path {corpus_cfg.path} is a file: corpus.source=folder reads a folder of media")
    if corpus_cfg.source in ("karpathy", "coco", "manifest") and Path(corpus_cfg.path).is_dir():
        raise CartError(f"corpus.path {corpus_cfg.path} is a folder: corpus.source={corpus_cfg.source} reads a file "
                        f"(corpus.source=folder reads a folder of media)")
    records, skipped, seen = [], [], dict(seen or {})
    for where, record in tqdm(sources[corpus_cfg.source](corpus_cfg), desc="corpus", unit=" items", leave=False):
        try:
            if isinstance(record, BadItem):
                raise record
            _check(record, seen, where, corpus_cfg.check_media)
        except BadItem as bad:
            if corpus_cfg.on_bad == "stop":
                raise CartError(f"{where}: {bad} (corpus.on_bad=skip leaves such items out)") from None
            skipped.append(f"{where}: {bad}")
            print(f"skipped {where}: {bad}", file=sys.stderr)  # `cart corpus` or `cart add`
            continue
        seen[record["id"]] = where
        records.append(record)
    if not records:
        raise CartError(f"corpus: no usable items in {corpus_cfg.path or corpus_cfg.source}")
    return records, skipped


def summarize(records: list[dict]) -> dict:
    kinds = Counter(t["kind"] if t["kind"] != "query" else f"query:{t['set']}" for r in records for t in r["texts"])
    return {
        "items": len(records),
        "modalities": dict(Counter(r["modality"] for r in records)),
        "texts": dict(sorted(kinds.items())),
    }


def _check(record: dict, seen: dict, where: str, check_media: bool) -> None:
    item_id = record.get("id")
    if not isinstance(item_id, str) or not item_id.strip():
        raise BadItem(f"missing item id: {item_id!r}")
    if not item_id.isprintable():  # an id is printed in tables and written in files, one line each
        raise BadItem(f"item id {item_id!r} is not one printable line (a line break or control character)")
    if item_id in seen:
        raise BadItem(f"duplicate item id {item_id!r} (first at {seen[item_id]})")
    if record.get("modality") not in MODALITIES:
        raise BadItem(f"unknown modality {record.get('modality')!r} (expected one of {', '.join(MODALITIES)})")
    path = Path(record["path"])
    if not path.is_file():
        raise BadItem(f"missing media file {path}")
    if check_media and record["modality"] == "image":
        try:
            with Image.open(path) as image:
                image.load()  # a full decode: verify() alone misses truncated files
        except Exception as e:  # PIL raises several types for broken files
            raise BadItem(f"unreadable or truncated image {path}: {e}") from None
    elif check_media:  # audio and video are decoded by the encoder; here their format is told from the bytes
        kind = filetype.guess(str(path))
        if kind is None or not kind.mime.startswith(record["modality"] + "/"):
            found = kind.mime if kind else f"no known {record['modality']} format"
            raise BadItem(f"the {record['modality']} item's file {path} holds {found}")
    if not record["texts"]:
        raise BadItem("no text: an item needs at least one training text or held-out query")
    for i, text in enumerate(record["texts"]):
        if not isinstance(text, dict) or not isinstance(text.get("text"), str):
            value = text.get("text") if isinstance(text, dict) else text
            raise BadItem(f"texts[{i}] should be a string, got {type(value).__name__} {value!r}")
        if not text["text"].strip():
            raise BadItem(f"empty text (texts[{i}])")
        if text.get("kind") not in KINDS:
            raise BadItem(f"texts[{i}]: unknown kind {text.get('kind')!r} (expected {', '.join(KINDS)})")
        if text["kind"] == "query" and not (isinstance(text.get("set"), str) and text["set"].strip()):
            raise BadItem(f"texts[{i}]: a query needs the name of its query set (\"set\")")


def _texts(strings: list, split: str, corpus_cfg: CorpusConfig) -> list[dict]:
    """Plain strings become captions, held-out queries for items of a query split, or validation queries
    for items of a validation split."""
    out = []
    for s in strings:
        if isinstance(s, dict):
            out.append(s)
        elif split in corpus_cfg.query_splits:
            out.append({"text": s, "kind": "query", "set": split})
        elif split in corpus_cfg.validation_splits:
            out.append({"text": s, "kind": "validation"})
        else:
            out.append({"text": s, "kind": "caption"})
    return out


def _media_root(corpus_cfg: CorpusConfig) -> Path:
    return Path(corpus_cfg.media_root) if corpus_cfg.media_root else Path(corpus_cfg.path).parent


def media_path(root: Path, value) -> str:
    """A media file's path: relative ones are read under the media root and may not leave it ("../x");
    an absolute path is the manifest author's explicit choice and is kept."""
    if not isinstance(value, str) or not value.strip():
        raise BadItem(f"path should be a file name, got {value!r}")
    if Path(value).is_absolute():
        return value
    path = os.path.normpath(root / value)
    if not inside(root, path):
        raise BadItem(f"path {value!r} leaves the media root {root} (an absolute path may point elsewhere)")
    return path


def inside(root: Path, path: str) -> bool:
    """Whether `path` lies under `root` once every link is followed (a link out of the root leaves it)."""
    root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), root]) == root


def _read_utf8(path: Path) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CartError(f"{path} line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path: Path):
    try:
        return json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise CartError(f"{path} line {e.lineno}: not valid JSON: {e.msg}") from None


def _emoji(corpus_cfg: CorpusConfig):
    for i, record in enumerate(emoji.load_items(corpus_cfg.cache_dir, corpus_cfg.test_tags)):
        yield f"emoji item {i} ({record['id']})", record


def _karpathy(corpus_cfg: CorpusConfig):
    data, root = _read_json(Path(corpus_cfg.path)), _media_root(corpus_cfg)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CartError(f"{corpus_cfg.path}: expected a Karpathy-split JSON with an 'images' list")
    for i, image in enumerate(data["images"]):
        where = f"{corpus_cfg.path} images[{i}]"
        try:
            split = image.get("split", corpus_cfg.split)
            relative = str(Path(image.get("filepath", "")) / image["filename"])
            yield where, {
                "id": str(image.get("cocoid", Path(image["filename"]).stem)),
                "modality": "image",
                "path": media_path(root, relative),
                "split": split,
                "texts": _texts([s["raw"] for s in image.get("sentences", [])], split, corpus_cfg),
            }
        except (KeyError, TypeError, AttributeError) as e:
            yield where, BadItem(f"malformed entry, missing {e}")
        except BadItem as bad:
            yield where, bad


def _coco(corpus_cfg: CorpusConfig):
    data, root = _read_json(Path(corpus_cfg.path)), _media_root(corpus_cfg)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise CartError(f"{corpus_cfg.path}: expected a COCO captions JSON with 'images' and 'annotations'")
    captions: dict = {}
    for a in data["annotations"]:
        captions.setdefault(a.get("image_id"), []).append(a.get("caption", ""))
    for i, image in enumerate(data["images"]):
        where = f"{corpus_cfg.path} images[{i}]"
        try:
            yield where, {
                "id": str(image["id"]),
                "modality": "image",
                "path": media_path(root, image["file_name"]),
                "split": corpus_cfg.split,
                "texts": _texts(captions.get(image["id"], []), corpus_cfg.split, corpus_cfg),
            }
        except (KeyError, TypeError, AttributeError) as e:
            yield where, BadItem(f"malformed entry, missing {e}")
        except BadItem as bad:
            yield where, bad


def _manifest(corpus_cfg: CorpusConfig):
    path, root = Path(corpus_cfg.path), _media_root(corpus_cfg)
    lines = path.read_bytes().splitlines(keepends=True)  # a quoted CSV text keeps its line breaks
    if path.suffix.lower() == ".csv":
        yield from _manifest_csv(path, lines, root, corpus_cfg)
        return
    for number, raw in enumerate(lines, 1):
        where = f"{path} line {number}"
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield where, BadItem(f"not UTF-8 text ({e.reason} at byte {e.start})")
            continue
        except json.JSONDecodeError as e:
            yield where, BadItem(f"not valid JSON: {e.msg}")
            continue
        yield where, _manifest_record(row, root, corpus_cfg)


def _manifest_csv(path: Path, lines: list[bytes], root: Path, corpus_cfg: CorpusConfig):
    """Rows of a CSV manifest, each named by the file line it starts on (a quoted text may span lines)."""
    decoded, numbers = [], []
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if number == 1:
                raise CartError(f"{path} line 1: header is not UTF-8 text") from None
            yield f"{path} line {number}", BadItem(f"not UTF-8 text ({e.reason} at byte {e.start})")
            continue
        decoded.append(line.removeprefix("\ufeff") if number == 1 else line)  # a UTF-8 BOM (Excel writes one)
        numbers.append(number)
    rows = csv.reader(decoded, strict=True)
    try:
        header = [h.strip() for h in next(rows, [])]
    except csv.Error as e:
        raise CartError(f"{path} line 1: not a CSV header: {e}") from None
    unknown = [h for h in header if h not in MANIFEST_COLUMNS]
    missing = [h for h in REQUIRED_COLUMNS if h not in header]
    if unknown or missing or len(set(header)) != len(header):
        problem = (f"unknown column {unknown[0]!r}" if unknown else f"no {missing[0]!r} column" if missing
                   else "a column named twice")
        raise CartError(f"{path} line 1: {problem}; the columns are {', '.join(MANIFEST_COLUMNS)} "
                        f"(id, path and texts required; texts separated by |)")
    while True:
        first = rows.line_num  # lines read so far: this row starts on the next one
        try:
            values = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            yield f"{path} line {numbers[first]}", BadItem(f"not valid CSV: {e}")
            continue
        where = f"{path} line {numbers[first]}"
        if not values:  # a blank line
            continue
        if len(values) != len(header):
            yield where, BadItem(f"{len(values)} fields where the header has {len(header)} "
                                 f"(a comma inside a text? quote the field)")
            continue
        if not any(v.strip() for v in values):  # a row of empty fields
            continue
        row = dict(zip(header, values))
        row["texts"] = row["texts"].split("|") if row["texts"].strip() else []
        yield where, _manifest_record(row, root, corpus_cfg)


def _manifest_record(row, root: Path, corpus_cfg: CorpusConfig):
    if not isinstance(row, dict):
        return BadItem(f"expected a JSON object with {', '.join(MANIFEST_COLUMNS)}")
    unknown = [k for k in row if k not in MANIFEST_COLUMNS]
    if unknown:
        return BadItem(f"unknown field {unknown[0]!r} (the fields are {', '.join(MANIFEST_COLUMNS)})")
    missing = [k for k in REQUIRED_COLUMNS if k not in row]
    if missing:
        return BadItem(f"missing {' and '.join(missing)}")
    item_id, texts, split = row["id"], row["texts"], row.get("split") or corpus_cfg.split
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        return BadItem(f"id should be a string or a whole number, got {item_id!r}")
    if not isinstance(texts, list):
        return BadItem("texts should be a list")
    if not isinstance(split, str):
        return BadItem(f"split should be a string, got {split!r}")
    modality = row.get("modality") or EXTENSIONS.get(Path(str(row["path"])).suffix.lower(), "")
    try:
        path = media_path(root, row["path"])
    except BadItem as bad:
        return bad
    return {
        "id": str(item_id),
        "modality": modality,
        "path": path,
        "split": split,
        "texts": _texts([t.strip() if isinstance(t, str) else t for t in texts], split, corpus_cfg),
    }


def _folder(corpus_cfg: CorpusConfig):
    """Every media file below the folder; texts from a `<name>.txt` beside it, one per line."""
    root = Path(corpus_cfg.path)
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()):
        where = str(path)
        if not inside(root, str(path)):
            yield where, BadItem(f"a link to {os.path.realpath(path)}, outside the folder {root}")
            continue
        texts = []
        sidecar = path.with_suffix(".txt")
        if sidecar.exists():
            for number, raw in enumerate(sidecar.read_bytes().splitlines(), 1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    texts = BadItem(f"{sidecar} line {number}: not UTF-8 text ({e.reason} at byte {e.start})")
                    break
                if line:
                    texts.append(line)
        if isinstance(texts, BadItem):
            yield where, texts
            continue
        if not texts:
            yield where, BadItem(f"no text: write its captions in {sidecar.name} beside it, one a line")
            continue
        yield where, {
            "id": str(path.relative_to(root).with_suffix("")),
            "modality": EXTENSIONS[path.suffix.lower()],
            "path": str(path),
            "split": corpus_cfg.split,
            "texts": _texts(texts, corpus_cfg.split, corpus_cfg),
        }
