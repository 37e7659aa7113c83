"""Property tests over random bad input: the corpus readers (JSONL, CSV, folder) and the config loader either
read their input correctly or raise CartError naming the file and line (or the key); never another exception,
never a silent change of content."""

import csv
import io
import json
import re
import string

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cart.config import Config, load_config, to_dict
from cart.data import corpus
from cart.errors import CartError
from conftest import ROOT, make_media

# derandomized: the same examples on every machine and every run, so CI cannot turn red by chance
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
PATHS = [f"media/img{i}.png" for i in range(6)]
# words with the characters that break naive parsers: separators, quotes, newlines, a BOM, non-ASCII
text = st.text(alphabet=string.ascii_letters + " ,|\"'\n\r\t;\ufeffé日", max_size=12)
word = st.text(alphabet=string.ascii_letters + " ,\"';é日", min_size=1, max_size=10).filter(str.strip)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                           max_leaves=6)


def mostly(good, bad):
    """Mostly good values (hypothesis leans to the low end of a range), so that many examples get far enough to
    test what is read, and bad ones often enough to test what is refused."""
    return st.integers(1, 6).flatmap(lambda i: bad if i == 6 else good)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("properties")
    make_media(folder)
    return folder


def read(root, path, *overrides):
    """The records `cart corpus` makes of the manifest at `path`, or the CartError it raises."""
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={root / 'runs'}", f"corpus.path={path}", *overrides])
    try:
        records = corpus.read(corpus.run(cfg).parent)
    except CartError as e:
        event("refused")
        return e
    event("read")
    return records


def names_a_line(error: CartError, path) -> bool:
    return bool(re.match(rf"{re.escape(str(path))} line \d+: ", str(error)))


row_values = st.fixed_dictionaries(
    {"id": mostly(st.text(string.ascii_lowercase, min_size=1, max_size=3) | st.integers(0, 99),
                  st.none() | st.booleans() | text),
     "path": mostly(st.sampled_from(PATHS), text),
     "texts": mostly(st.lists(word, min_size=1, max_size=3), st.lists(text, max_size=3) | json_values)},
    optional={"modality": mostly(st.sampled_from(["image"]), st.sampled_from(["audio", "smell", ""]) | json_values),
              "split": mostly(st.sampled_from(["train", "test"]), json_values)})


@SETTINGS
@given(rows=st.lists(mostly(row_values, json_values), min_size=1, max_size=3), garbage=st.binary(max_size=8))
def test_jsonl_manifest_reads_each_row_exactly_or_names_its_line(root, rows, garbage):
    path = root / "m.jsonl"
    lines = [json.dumps(row).encode() for row in rows] + ([garbage] if garbage.strip() else [])
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = read(root, path)
    if isinstance(result, CartError):
        assert names_a_line(result, path), result
        return
    assert len(result) == len(rows) and not garbage.strip()  # every line is an item: nothing dropped
    for record, row in zip(result, rows):
        assert record["id"] == str(row["id"]) and record["path"] == str(root / row["path"])
        assert [t["text"] for t in record["texts"]] == [t.strip() for t in row["texts"]]
        kind = "query" if record["split"] in ("test",) else "caption"
        assert {t["kind"] for t in record["texts"]} == {kind}


caption = text.map(lambda s: s.replace("|", "/"))  # | separates a CSV item's texts
csv_rows = st.lists(st.tuples(mostly(st.text(string.ascii_lowercase, min_size=1, max_size=3), text),
                              mostly(st.sampled_from(PATHS), text),
                              mostly(st.lists(word, min_size=1, max_size=3), st.lists(caption, min_size=1, max_size=3)),
                              mostly(st.sampled_from(["train", "test", ""]), text)),
                    min_size=1, max_size=3)


@SETTINGS
@given(rows=csv_rows, quoted=st.booleans(), bom=st.booleans())
def test_csv_manifest_reads_each_row_exactly_or_names_its_line(root, rows, quoted, bom):
    path = root / "m.csv"
    buffer = io.StringIO()
    header = ["id", "modality", "path", "texts", "split"]
    lines = [header, *[(i, "image", p, "|".join(t), s) for i, p, t, s in rows]]
    if quoted:  # what a CSV writer makes: every field survives, commas and newlines included
        csv.writer(buffer, lineterminator="\n").writerows(lines)
    else:  # fields joined by hand: a comma inside a text breaks the row (line breaks and quotes, which change
        # what the file means as CSV, are left out)
        rows = [tuple(re.sub(r'[\r\n"]', " ", f) if isinstance(f, str) else [re.sub(r'[\r\n"]', " ", t) for t in f]
                      for f in row) for row in rows]
        lines = [header, *[(i, "image", p, "|".join(t), s) for i, p, t, s in rows]]
        buffer.write("\n".join(",".join(line) for line in lines) + "\n")
    path.write_text(("\ufeff" if bom else "") + buffer.getvalue(), encoding="utf-8")
    result = read(root, path)
    if isinstance(result, CartError):
        assert names_a_line(result, path), result
        return
    # blank rows are skipped; every other row is one item, read field for field
    assert len(result) == len(rows)
    for record, (item_id, media, texts, split) in zip(result, rows):
        assert record["id"] == item_id and record["path"] == str(root / media)
        assert [t["text"] for t in record["texts"]] == [t.strip() for t in texts]
        assert record["split"] == (split or "train")


@SETTINGS
@given(sidecar=st.binary(max_size=40) | text.map(str.encode))
def test_folder_reads_sidecar_lines_exactly_or_names_the_line(root, sidecar):
    folder = root / "folder"
    make_media(folder)
    for i in range(6):
        (folder / "media" / f"img{i}.txt").write_text(f"colour {i}\n", encoding="utf-8")
    (folder / "media" / "img0.txt").write_bytes(sidecar)
    result = read(root, folder / "media", "corpus.source=folder")
    if isinstance(result, CartError):
        media = re.escape(str(folder / "media"))
        assert re.match(rf"{media}/img0\.png: (no text|{media}/img0\.txt line \d+: not UTF-8)", str(result)), result
        return
    lines = [line.decode("utf-8").strip() for line in sidecar.splitlines()]  # lines end at \n, \r\n or \r
    lines = [line for line in lines if line]
    assert [t["text"] for t in result[0]["texts"]] == lines


def config_keys(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from config_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


KEYS = sorted(config_keys(to_dict(Config()))) + ["train.nosuch", "nosuch", "train"]
yaml_values = st.one_of(st.integers(min_value=-10**12, max_value=10**12), st.floats(), st.booleans(), st.none(),
                        st.sampled_from(["nan", "-inf", "1e-3", "[1, 2]", "{a: 1}", "[", "''", "auto", "test"]),
                        text.filter(lambda s: "\n" not in s and "\r" not in s))


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(key=st.sampled_from(KEYS), value=yaml_values)
def test_config_loads_a_value_or_names_the_key(key, value):
    try:
        cfg = load_config(ROOT / "configs/emoji.yaml", [f"{key}={value}"])
    except CartError as e:
        assert str(e).startswith("configs/emoji.yaml: ") or str(e).startswith(f"{ROOT}/configs/emoji.yaml: ")
        assert key.split(".")[-1] in str(e) or key.split(".")[0] in str(e), str(e)
        assert "\n" not in str(e)
        return
    node = to_dict(cfg)
    for part in key.split("."):
        node = node[part]
    assert node is not None  # a value that loads has the field's type: never None where a number belongs
