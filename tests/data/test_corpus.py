import json

import numpy as np
import pytest

from cart import files
from cart.data import corpus
from cart.errors import CartError
from conftest import COLOURS, make_image, silent_wav, write_jsonl


def texts_of(records, kind):
    return {r["id"]: [t["text"] for t in r["texts"] if t["kind"] == kind] for r in records}


def test_manifest_jsonl(tiny_config, manifest):
    cfg = tiny_config(f"corpus.path={manifest}")
    out = corpus.run(cfg)
    records = corpus.read(cfg.run_dir)
    assert out == cfg.run_dir / files.CORPUS
    assert [r["id"] for r in records] == [f"item{i}" for i in range(6)]
    assert texts_of(records, "caption")["item0"] == ["a red shape", "red"]
    # item5 is in a query split: its texts are held out as queries of set "test"
    assert texts_of(records, "caption")["item5"] == []
    assert {t["set"] for t in records[5]["texts"]} == {"test"}
    manifest_json = json.loads(files.manifest_path(out).read_text())
    assert manifest_json["stage"] == "corpus" and manifest_json["inputs"] == {"manifest.jsonl": files.sha256_file(manifest)}


def test_manifest_csv(tiny_config, tmp_path, media):
    path = tmp_path / "m.csv"
    path.write_text("id,modality,path,texts,split\n"
                    "a,image,media/img0.png,red square|a square,train\n"
                    'b,image,media/img1.png,"green, round",test\n', encoding="utf-8")
    records = corpus.read(corpus.run(tiny_config(f"corpus.path={path}")).parent)
    assert texts_of(records, "caption") == {"a": ["red square", "a square"], "b": []}
    assert texts_of(records, "query") == {"a": [], "b": ["green, round"]}


def test_karpathy_split_json(tiny_config, tmp_path, media):
    data = {"dataset": "flickr30k", "images": [
        {"filename": f"img{i}.png", "split": split, "imgid": i, "sentences": [{"raw": f"caption {i}"}]}
        for i, split in enumerate(["train", "restval", "val", "test"])
    ]}
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(data))
    records = corpus.read(corpus.run(tiny_config("corpus.source=karpathy", f"corpus.path={path}",
                                                 f"corpus.media_root={media}")).parent)
    assert [r["id"] for r in records] == ["img0", "img1", "img2", "img3"]
    assert [r["split"] for r in records] == ["train", "restval", "val", "test"]
    assert texts_of(records, "caption") == {"img0": ["caption 0"], "img1": ["caption 1"], "img2": [], "img3": []}
    # val captions are validation queries (never trained on, never a test), test captions held-out queries
    assert [(t["kind"], t.get("set")) for r in records for t in r["texts"]] == [
        ("caption", None), ("caption", None), ("validation", None), ("query", "test")]
    with pytest.raises(CartError, match=r"corpus.validation_splits and corpus.query_splits both name \['val'\]"):
        tiny_config("corpus.query_splits=[val, test]")
    records = corpus.read(corpus.run(tiny_config("corpus.source=karpathy", f"corpus.path={path}", "run=both",
                                                 f"corpus.media_root={media}", "corpus.query_splits=[val, test]",
                                                 "corpus.validation_splits=[]")).parent)
    assert [t.get("set") for r in records for t in r["texts"]] == [None, None, "val", "test"]


def test_coco_captions_json(tiny_config, tmp_path, media):
    data = {"images": [{"id": 7, "file_name": "img0.png"}, {"id": 9, "file_name": "img1.png"}],
            "annotations": [{"image_id": 7, "caption": "red"}, {"image_id": 9, "caption": "green"},
                            {"image_id": 7, "caption": "a red block"}]}
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps(data))
    records = corpus.read(corpus.run(tiny_config("corpus.source=coco", f"corpus.path={path}",
                                                 f"corpus.media_root={media}")).parent)
    assert texts_of(records, "caption") == {"7": ["red", "a red block"], "9": ["green"]}


def sidecars(media):
    for i, colour in enumerate(COLOURS):
        (media / f"img{i}.txt").write_text(f"{colour}\n", encoding="utf-8")


def test_folder_with_sidecar_texts(tiny_config, media):
    sidecars(media)
    (media / "img0.txt").write_text("red square\n\nscarlet\n", encoding="utf-8")
    (media / "sub").mkdir()
    make_image(media / "sub" / "deep.jpg", "blue")
    (media / "sub" / "deep.txt").write_text("deep blue\n", encoding="utf-8")
    records = corpus.read(corpus.run(tiny_config("corpus.source=folder", f"corpus.path={media}")).parent)
    assert len(records) == 7
    assert texts_of(records, "caption")["img0"] == ["red square", "scarlet"]
    assert "sub/deep" in {r["id"] for r in records}


def test_folder_item_without_texts_is_bad_input(tiny_config, media, capsys):
    sidecars(media)
    (media / "img4.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CartError, match="img4.png: no text: write its captions in img4.txt beside it"):
        corpus.run(tiny_config("corpus.source=folder", f"corpus.path={media}"))
    out = corpus.run(tiny_config("corpus.source=folder", f"corpus.path={media}", "corpus.on_bad=skip"))
    assert [r["id"] for r in corpus.read(out.parent)] == ["img0", "img1", "img2", "img3", "img5"]
    assert "skipped" in capsys.readouterr().err


def bad_rows(media):
    good = {"id": "ok", "modality": "image", "path": "media/img0.png", "texts": ["red"]}
    (media / "broken.png").write_bytes((media / "img1.png").read_bytes()[:60])
    return {
        "missing media file": {**good, "id": "x", "path": "media/nope.png"},
        "unreadable or truncated image": {**good, "id": "x", "path": "media/broken.png"},
        "empty text": {**good, "id": "x", "texts": ["fine", "  "]},
        "duplicate item id 'ok'": good,
        "unknown modality 'smell'": {**good, "id": "x", "modality": "smell"},
        "not UTF-8 text": b'{"id": "x", "path": "media/img0.png", "texts": ["caf\xe9"]}',
        "not valid JSON": '{"id": "x", ',
    }


PROBLEMS = ["missing media file", "unreadable or truncated image", "empty text", "duplicate item id 'ok'",
            "unknown modality 'smell'", "not UTF-8 text", "not valid JSON"]


def as_line(row) -> bytes:
    return row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode()


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_item_stops_with_file_and_line(tiny_config, tmp_path, media, problem):
    row = bad_rows(media)[problem]
    good = bad_rows(media)["duplicate item id 'ok'"]
    path = tmp_path / "m.jsonl"
    path.write_bytes(as_line(good) + b"\n" + as_line(row) + b"\n")
    cfg = tiny_config(f"corpus.path={path}")
    with pytest.raises(CartError, match=f"m.jsonl line 2: {problem}"):
        corpus.run(cfg)
    assert not cfg.run_dir.exists() or list(cfg.run_dir.iterdir()) == []  # nothing half-written


def test_skip_reports_each_bad_item_and_count(tiny_config, tmp_path, media, capsys):
    rows = bad_rows(media)
    path = tmp_path / "m.jsonl"
    assert list(rows) == PROBLEMS
    path.write_bytes(b"\n".join(as_line(r) for r in [rows["duplicate item id 'ok'"], *rows.values()]) + b"\n")
    out = corpus.run(tiny_config(f"corpus.path={path}", "corpus.on_bad=skip"))
    assert [r["id"] for r in corpus.read(out.parent)] == ["ok"]
    captured = capsys.readouterr()
    assert captured.err.count("skipped") == len(rows)
    for number, problem in enumerate(rows, 2):
        assert f"m.jsonl line {number}: {problem}" in captured.err
    assert "1 items" in captured.out and f"{len(rows)} skipped" in captured.out
    assert len(json.loads(files.manifest_path(out).read_text())["skipped"]) == len(rows)


def test_csv_and_sidecar_non_utf8_name_the_line(tiny_config, tmp_path, media):
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,modality,path,texts,split\na,image,media/img0.png,red,train\nb,image,media/img1.png,gr\xfcn,train\n")
    with pytest.raises(CartError, match="m.csv line 3: not UTF-8 text"):
        corpus.run(tiny_config(f"corpus.path={path}"))
    sidecars(media)
    (media / "img2.txt").write_bytes(b"blue\nbl\xe4u\n")
    with pytest.raises(CartError, match="img2.txt line 2: not UTF-8 text"):
        corpus.run(tiny_config("corpus.source=folder", f"corpus.path={media}"))


def test_whole_file_errors(tiny_config, tmp_path):
    path = tmp_path / "dataset.json"
    path.write_bytes(b'{"images": [\n{"filename": "caf\xe9.jpg"}]}')
    with pytest.raises(CartError, match="dataset.json line 2: not UTF-8 text"):
        corpus.run(tiny_config("corpus.source=karpathy", f"corpus.path={path}"))
    path.write_text('{"images": 3}')
    with pytest.raises(CartError, match="expected a Karpathy-split JSON"):
        corpus.run(tiny_config("corpus.source=karpathy", f"corpus.path={path}"))


def test_failed_run_keeps_the_previous_corpus(tiny_config, tmp_path, manifest, media):
    cfg = tiny_config(f"corpus.path={manifest}")
    out = corpus.run(cfg)
    before = out.read_bytes()
    (media / "img3.png").unlink()
    with pytest.raises(CartError, match="missing media file"):
        corpus.run(cfg)
    assert out.read_bytes() == before
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["corpus.jsonl", "corpus.manifest.json"]


def test_corpus_edited_by_hand_is_refused(tiny_config, manifest):
    cfg = tiny_config(f"corpus.path={manifest}")
    out = corpus.run(cfg)
    out.write_text(out.read_text().replace("red", "blue"))
    with pytest.raises(CartError, match="does not match its manifest"):
        corpus.read(cfg.run_dir)


def write_csv(path, *rows):
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("row, fields", [
    ("b,image,media/img1.png,green, round,test", 6),  # an unquoted comma: "round" would land in `split`
    ("b,image,media/img1.png,green", 4),
])
def test_csv_row_with_other_field_count_names_the_line(tiny_config, tmp_path, media, row, fields):
    path = write_csv(tmp_path / "m.csv", "id,modality,path,texts,split", "a,image,media/img0.png,red,train", row)
    with pytest.raises(CartError, match=f"m.csv line 3: {fields} fields where the header has 5 "
                                        r"\(a comma inside a text\? quote the field\)"):
        corpus.run(tiny_config(f"corpus.path={path}"))


def test_csv_with_a_bom_and_a_text_over_two_lines(tiny_config, tmp_path, media):
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffid,path,texts\na,media/img0.png,\"red\nsquare\"\nb,media/img1.png,green\n"
                     "c,media/nope.png,blue\n".encode("utf-8"))
    with pytest.raises(CartError, match="m.csv line 5: missing media file"):  # the quoted text took lines 2-3
        corpus.run(tiny_config(f"corpus.path={path}"))
    write_csv(path, "\ufeffid,path,texts", "a,media/img0.png,red", "b,media/img1.png,green")
    records = corpus.read(corpus.run(tiny_config(f"corpus.path={path}")).parent)
    assert [r["id"] for r in records] == ["a", "b"] and records[0]["modality"] == "image"


@pytest.mark.parametrize("header, message", [
    ("id,modality,path,captions,split", "unknown column 'captions'"),
    ("id,modality,path,split", "no 'texts' column"),
    ("id,path,texts,texts", "a column named twice"),
])
def test_csv_header_must_name_known_columns(tiny_config, tmp_path, media, header, message):
    path = write_csv(tmp_path / "m.csv", header, "a,image,media/img0.png,red,train")
    with pytest.raises(CartError, match=f"m.csv line 1: {message}; the columns are id, modality, path, texts, split"):
        corpus.run(tiny_config(f"corpus.path={path}"))


@pytest.mark.parametrize("change, message", [
    ({"texts": None}, "missing texts"),
    ({"texts": []}, "no text: an item needs at least one training text or held-out query"),
    ({"id": None}, "id should be a string or a whole number, got None"),
    ({"captions": ["red"]}, "unknown field 'captions'"),
    ({"texts": ["red", 3]}, "texts\\[1\\] should be a string, got int 3"),
    ({"texts": [{"text": "red", "kind": "query"}]}, "texts\\[0\\]: a query needs the name of its query set"),
    ({"split": 3}, "split should be a string, got 3"),
    ({"id": "../../evil\nid"}, r"item id '../../evil\\nid' is not one printable line"),
    ({"id": "tab\there"}, r"item id 'tab\\there' is not one printable line"),
])
def test_jsonl_items_without_usable_text_or_id_are_bad_input(tiny_config, tmp_path, media, change, message):
    row = {"id": "a", "modality": "image", "path": "media/img0.png", "texts": ["red"]} | change
    row = {k: v for k, v in row.items() if not (k == "texts" and v is None)}
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "ok", "path": "media/img1.png", "texts": ["green"]}, row])
    with pytest.raises(CartError, match=f"m.jsonl line 2: {message}"):
        corpus.run(tiny_config(f"corpus.path={path}"))
    out = corpus.run(tiny_config(f"corpus.path={path}", "corpus.on_bad=skip"))
    assert [r["id"] for r in corpus.read(out.parent)] == ["ok"]


def test_media_paths_stay_inside_the_media_root_unless_absolute(tiny_config, tmp_path, media):
    outside = make_image(tmp_path / "elsewhere" / "x.png")
    rows = [{"id": "a", "modality": "audio", "path": "../../etc/passwd", "texts": ["secret"]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(CartError, match=r"m.jsonl line 1: path '../../etc/passwd' leaves the media root"):
        corpus.run(tiny_config(f"corpus.path={path}"))
    write_jsonl(path, [{"id": "a", "path": "media/../media/img0.png", "texts": ["red"]},
                       {"id": "b", "path": str(outside), "texts": ["elsewhere"]}])  # absolute: the author's choice
    records = corpus.read(corpus.run(tiny_config(f"corpus.path={path}")).parent)
    assert [r["path"] for r in records] == [str(media / "img0.png"), str(outside)]
    data = {"images": [{"filename": "../../../etc/passwd", "split": "train", "sentences": [{"raw": "x"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(data))
    with pytest.raises(CartError, match=r"k.json images\[0\]: path .* leaves the media root"):
        corpus.run(tiny_config("corpus.source=karpathy", f"corpus.path={tmp_path / 'k.json'}"))


def test_a_link_inside_the_media_root_that_points_outside_it_is_refused(tiny_config, tmp_path, media):
    outside = make_image(tmp_path / "elsewhere" / "x.png")
    (media / "link.png").symlink_to(outside)
    (media / "inner.png").symlink_to(media / "img1.png")  # a link that stays inside is fine
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "path": "inner.png", "texts": ["green"]},
                                              {"id": "b", "path": "link.png", "texts": ["elsewhere"]}])
    with pytest.raises(CartError, match=r"m.jsonl line 2: path 'link.png' leaves the media root"):
        corpus.run(tiny_config(f"corpus.path={path}", f"corpus.media_root={media}"))
    records = corpus.read(corpus.run(tiny_config(f"corpus.path={path}", f"corpus.media_root={media}",
                                                 "corpus.on_bad=skip")).parent)
    assert [r["path"] for r in records] == [str(media / "inner.png")]
    for image in media.glob("*.png"):
        image.with_suffix(".txt").write_text("a shape\n")
    with pytest.raises(CartError, match=r"link.png: a link to .*elsewhere/x.png, outside the folder"):
        corpus.run(tiny_config("corpus.source=folder", f"corpus.path={media}"))


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_an_audio_or_video_item_must_hold_audio_or_video(tiny_config, tmp_path, media, modality):
    silent_wav(tmp_path / "tone.wav")
    (tmp_path / "notes.mp3").write_text("not audio at all")
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "modality": modality, "path": "media/img0.png",
                                               "texts": ["red"]}])
    with pytest.raises(CartError, match=f"m.jsonl line 1: the {modality} item's file .*img0.png holds image/png"):
        corpus.run(tiny_config(f"corpus.path={path}"))
    write_jsonl(path, [{"id": "a", "modality": modality, "path": "notes.mp3", "texts": ["red"]}])
    with pytest.raises(CartError, match=f"notes.mp3 holds no known {modality} format"):
        corpus.run(tiny_config(f"corpus.path={path}"))
    write_jsonl(path, [{"id": "a", "modality": "audio", "path": "tone.wav", "texts": ["a tone"]}])
    assert corpus.read(corpus.run(tiny_config(f"corpus.path={path}")).parent)[0]["modality"] == "audio"


def test_corpus_path_of_the_wrong_kind_is_one_clear_error(tiny_config, tmp_path, media, manifest):
    with pytest.raises(CartError, match="is a folder: corpus.source=manifest reads a file"):
        corpus.run(tiny_config(f"corpus.path={tmp_path}"))
    with pytest.raises(CartError, match="is a file: corpus.source=folder reads a folder"):
        corpus.run(tiny_config("corpus.source=folder", f"corpus.path={manifest}"))


def test_a_corpus_used_by_later_stages_is_not_replaced_silently(tiny_config, tmp_path, manifest, capsys):
    from cart.encoders import embed

    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    cfg = tiny_config(f"corpus.path={manifest}", "embed.encoder=precomputed", f"embed.weights={tmp_path / 'emb.npy'}")
    corpus.run(cfg)
    corpus.run(cfg)  # the same content again: nothing to refuse
    embed.run(cfg)
    before = (cfg.run_dir / files.CORPUS).read_bytes()
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    write_jsonl(manifest, rows[:-1])
    with pytest.raises(CartError, match="corpus.jsonl exists, made from other inputs or settings, and "
                                        r"embeddings.safetensors were built from it: choose another run name "
                                        r"\(run=NAME\), or `cart corpus --force`"):
        corpus.run(cfg)
    assert (cfg.run_dir / files.CORPUS).read_bytes() == before
    capsys.readouterr()
    corpus.run(cfg, force=True)
    assert len(corpus.read(cfg.run_dir)) == 5
    assert "embeddings.safetensors, built from it, will then be stale" in capsys.readouterr().err
