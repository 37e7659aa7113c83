"""Stage `cart corpus`: read a dataset source, check every item, write `corpus.jsonl`.

Reads one of: the built-in emoji set, a Karpathy-split JSON (`dataset_flickr30k.json`,
`dataset_coco.json`), a COCO captions JSON, a JSONL or CSV manifest, a folder of media.
Writes `checkpoints/<run>/corpus.jsonl`, one record per line:

    {"id": "1f431", "modality": "image", "path": "/abs/1f431.png", "split": "train",
     "texts": [{"text": "kitten", "kind": "caption"}, {"text": "cat face", "kind": "query", "set": "A"}],
     "meta": {...}}

Text kinds: `caption` (a training query), `generated` (added by `cart caption`),
`query` (held out; `set` names the query set). Items of `corpus.query_splits`
have their texts held out as queries of a set named after the split.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from cart import emoji, files
from cart.config import Config, CorpusConfig, to_dict
from cart.errors import CartError

TRAINING_KINDS = ("caption", "generated")  # text kinds that are training queries; `query` is held out


def item_document(record: dict) -> str:
    """An item's training text as one string: its distinct training texts joined by spaces, leaving out
    texts contained in another one (for the emoji set: the tags, whose joined form is itself a text)."""
    texts = list(dict.fromkeys(t["text"] for t in record["texts"] if t["kind"] in TRAINING_KINDS))
    kept = [t for t in texts if not any(t != other and t in other for other in texts)]
    return " ".join(kept)


MODALITIES = ("image", "audio", "video")
EXTENSIONS = {
    **dict.fromkeys((".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"), "image"),
    **dict.fromkeys((".wav", ".flac", ".mp3", ".ogg", ".m4a"), "audio"),
    **dict.fromkeys((".mp4", ".avi", ".mkv", ".mov", ".webm"), "video"),
}
MANIFEST_COLUMNS = ("id", "modality", "path", "texts", "split")


class BadItem(Exception):
    """One item that cannot enter the corpus; the message says why."""


def run(cfg: Config) -> Path:
    """Build `corpus.jsonl` in the run folder from `cfg.corpus`; return its path."""
    c = cfg.corpus
    sources = {"emoji": _emoji, "karpathy": _karpathy, "coco": _coco, "manifest": _manifest, "folder": _folder}
    if c.source != "emoji" and not c.path:
        raise CartError(f"corpus.path is required for corpus.source={c.source}")
    if c.path and not Path(c.path).exists():
        raise CartError(f"corpus.path not found: {c.path}")
    records, skipped, seen = [], [], {}
    for where, record in tqdm(sources[c.source](c), desc="corpus", unit=" items", leave=False):
        try:
            if isinstance(record, BadItem):
                raise record
            _check(record, seen, where, c.check_media)
        except BadItem as bad:
            if c.on_bad == "stop":
                raise CartError(f"{where}: {bad} (corpus.on_bad=skip leaves such items out)") from None
            skipped.append(f"{where}: {bad}")
            print(f"cart corpus: skipped {where}: {bad}", file=sys.stderr)
            continue
        seen[record["id"]] = where
        records.append(record)
    if not records:
        raise CartError(f"corpus: no usable items in {c.path or c.source}")
    out = cfg.run_dir / files.CORPUS
    with files.atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    inputs = {Path(c.path).name: files.sha256_file(c.path)} if Path(c.path).is_file() else {}
    if c.source == "emoji":
        inputs = dict(emoji.PACKAGES)
    stats = summarize(records)
    files.write_manifest(out, "corpus", to_dict(cfg), inputs, stats=stats, skipped=skipped)
    kinds = ", ".join(f"{n} {k}" for k, n in stats["texts"].items())
    print(f"corpus: {len(records)} items ({kinds}); {len(skipped)} skipped -> {out}")
    return out


def read(run_dir: Path) -> list[dict]:
    """The corpus records of a run, refusing a corpus that does not match its manifest."""
    path, _ = files.verified_input(run_dir, files.CORPUS)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


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
    for i, text in enumerate(record["texts"]):
        if not isinstance(text.get("text"), str) or not text["text"].strip():
            raise BadItem(f"empty text (texts[{i}])")
        if text.get("kind") not in ("caption", "generated", "query"):
            raise BadItem(f"texts[{i}]: unknown kind {text.get('kind')!r} (expected caption, generated or query)")


def _texts(strings: list, split: str, c: CorpusConfig) -> list[dict]:
    """Plain strings become captions, or held-out queries for items of a query split."""
    out = []
    for s in strings:
        if isinstance(s, dict):
            out.append(s)
        elif split in c.query_splits:
            out.append({"text": s, "kind": "query", "set": split})
        else:
            out.append({"text": s, "kind": "caption"})
    return out


def _media_root(c: CorpusConfig) -> Path:
    return Path(c.media_root).expanduser() if c.media_root else Path(c.path).expanduser().parent


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


def _emoji(c: CorpusConfig):
    for i, record in enumerate(emoji.load_items(c.cache_dir)):
        yield f"emoji item {i} ({record['id']})", record


def _karpathy(c: CorpusConfig):
    data, root = _read_json(Path(c.path)), _media_root(c)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CartError(f"{c.path}: expected a Karpathy-split JSON with an 'images' list")
    for i, image in enumerate(data["images"]):
        where = f"{c.path} images[{i}]"
        try:
            split = image.get("split", c.split)
            relative = Path(image.get("filepath", "")) / image["filename"]
            yield where, {
                "id": str(image.get("cocoid", Path(image["filename"]).stem)),
                "modality": "image",
                "path": str(root / relative),
                "split": split,
                "texts": _texts([s["raw"] for s in image.get("sentences", [])], split, c),
            }
        except (KeyError, TypeError) as e:
            yield where, BadItem(f"malformed entry, missing {e}")


def _coco(c: CorpusConfig):
    data, root = _read_json(Path(c.path)), _media_root(c)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise CartError(f"{c.path}: expected a COCO captions JSON with 'images' and 'annotations'")
    captions: dict = {}
    for a in data["annotations"]:
        captions.setdefault(a.get("image_id"), []).append(a.get("caption", ""))
    for i, image in enumerate(data["images"]):
        where = f"{c.path} images[{i}]"
        try:
            yield where, {
                "id": str(image["id"]),
                "modality": "image",
                "path": str(root / image["file_name"]),
                "split": c.split,
                "texts": _texts(captions.get(image["id"], []), c.split, c),
            }
        except (KeyError, TypeError) as e:
            yield where, BadItem(f"malformed entry, missing {e}")


def _manifest(c: CorpusConfig):
    path, root = Path(c.path), _media_root(c)
    lines = path.read_bytes().splitlines()
    if path.suffix.lower() == ".csv":
        yield from _manifest_csv(path, lines, root, c)
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
        yield where, _manifest_record(row, root, c)


def _manifest_csv(path: Path, lines: list[bytes], root: Path, c: CorpusConfig):
    decoded = []
    for number, raw in enumerate(lines, 1):
        try:
            decoded.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            if number == 1:
                raise CartError(f"{path} line 1: header is not UTF-8 text") from None
            yield f"{path} line {number}", BadItem(f"not UTF-8 text ({e.reason} at byte {e.start})")
            decoded.append(None)
    rows = csv.reader(line for line in decoded if line is not None)
    header = next(rows, [])
    if tuple(h.strip() for h in header[:3]) != MANIFEST_COLUMNS[:3]:
        raise CartError(f"{path} line 1: expected the columns {', '.join(MANIFEST_COLUMNS)}; texts are separated by |")
    numbers = [n for n, line in enumerate(decoded, 1) if line is not None][1:]
    for number, values in zip(numbers, rows):
        if not any(v.strip() for v in values):
            continue
        row = dict(zip([h.strip() for h in header], values))
        row["texts"] = row.get("texts", "").split("|") if row.get("texts", "").strip() else []
        yield f"{path} line {number}", _manifest_record(row, root, c)


def _manifest_record(row, root: Path, c: CorpusConfig):
    if not isinstance(row, dict):
        return BadItem("expected a JSON object with id, modality, path, texts, split")
    missing = [k for k in ("id", "path") if k not in row]
    if missing:
        return BadItem(f"missing {' and '.join(missing)}")
    texts = row.get("texts", [])
    if not isinstance(texts, list):
        return BadItem("texts should be a list")
    split = row.get("split") or c.split
    return {
        "id": str(row["id"]),
        "modality": row.get("modality", EXTENSIONS.get(Path(str(row["path"])).suffix.lower(), "")),
        "path": str(root / str(row["path"])),
        "split": split,
        "texts": _texts([t.strip() if isinstance(t, str) else t for t in texts], split, c),
    }


def _folder(c: CorpusConfig):
    """Every media file below the folder; texts from a `<name>.txt` beside it, one per line."""
    root = Path(c.path).expanduser()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()):
        where = str(path)
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
        yield where, {
            "id": str(path.relative_to(root).with_suffix("")),
            "modality": EXTENSIONS[path.suffix.lower()],
            "path": str(path),
            "split": c.split,
            "texts": _texts(texts, c.split, c),
        }
