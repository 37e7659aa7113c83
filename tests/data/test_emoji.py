"""The built-in benchmark data, from the pinned npm packages (fetched once into ~/.cache/cart)."""

from collections import Counter

import pytest

from cart.data import emoji
from cart.errors import CartError
from cart.settings import CorpusConfig


@pytest.fixture(scope="module")
def items():
    return emoji.load_items(CorpusConfig().cache_dir)


def test_the_1911_items_and_their_splits(items):
    assert len(items) == 1911
    assert len({i["id"] for i in items}) == 1911
    sets = Counter(t.get("set", t["kind"]) for i in items for t in i["texts"])
    assert sets["A"] == 1911  # one label per emoji
    assert 480 <= sets["T"] <= 540  # 5% of the tags
    assert 1650 <= sets["B"] <= 1750  # "about 1,700" shortcodes
    assert all(any(t["kind"] == "caption" for t in i["texts"]) for i in items)


def test_training_texts_are_tags_and_queries_are_held_out(items):
    cat = next(i for i in items if i["id"] == "1f431")
    captions = [t["text"] for t in cat["texts"] if t["kind"] == "caption"]
    tags = ["animal", "cat", "face", "kitten", "kitty", "pet"]
    held = [t["text"] for t in cat["texts"] if t.get("set") == "T"]  # set T may hold one of them out
    kept = [t for t in tags if t not in held]
    assert captions == kept + [" ".join(kept)]
    assert [t["text"] for t in cat["texts"] if t.get("set") == "A"] == ["cat face"]
    for item in items:
        tags = {t.lower() for t in item["meta"]["tags"]}
        label = item["meta"]["label"].lower()
        for text in item["texts"]:
            if text.get("set") == "B":  # shortcodes never repeat the label or a tag
                assert text["text"].lower() not in tags | {label}


def test_set_t_holds_out_tags_and_v_is_other_vendors_names_that_no_other_text_repeats(items):
    tags = sum(len(item["meta"]["tags"]) for item in items)
    held = {item["id"]: [t["text"] for t in item["texts"] if t.get("set") == "T"] for item in items}
    assert sum(map(len, held.values())) == round(0.05 * tags) and max(map(len, held.values())) == 1
    for item in items:
        captions = [t["text"] for t in item["texts"] if t["kind"] == "caption"]
        for tag in held[item["id"]]:  # one of its tags, trained neither alone nor in the joined tags
            assert tag in item["meta"]["tags"] and tag.lower() != item["meta"]["label"].lower()
            assert tag not in captions and not any(tag in c.split() for c in captions if " " in c)
    names = [(item["id"], t["text"]) for item in items for t in item["texts"] if t["kind"] == "validation"]
    assert 880 <= len(names) <= 940 and 750 <= len({i for i, _ in names}) <= 800  # issue 25 counted 908 on 772
    others = {emoji.normalized(t["text"]) for item in items for t in item["texts"] if t["kind"] != "validation"}
    assert all(name == emoji.normalized(name) and name not in others for _, name in names)
    assert {"sunshower", "knocked out", "banknote with pound sign", "finland flag"} <= {name for _, name in names}
    assert emoji.normalized("Clock_Face-Seven  O'Clock") == "clock face seven o clock"


def test_without_set_t_every_tag_is_trained_on():
    cat = next(i for i in emoji.load_items(CorpusConfig().cache_dir, test_tags=0) if i["id"] == "1f431")
    assert [t["text"] for t in cat["texts"] if t["kind"] == "caption"] == [
        "animal", "cat", "face", "kitten", "kitty", "pet", "animal cat face kitten kitty pet"]
    assert not [t for t in cat["texts"] if t.get("set") == "T"]


def test_skin_tone_variants_are_left_out(items):
    # U+1F3FB..U+1F3FF are the tone modifiers: alone they are swatch emoji, after another code point a variant
    tones = ("-1f3fb", "-1f3fc", "-1f3fd", "-1f3fe", "-1f3ff")
    assert not any(tone in i["id"] for i in items for tone in tones)
    assert {"1f3fb", "1f44d"} <= {i["id"] for i in items}  # the swatch and the neutral thumbs up stay


def test_npm_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CartError, match="npm not found"):
        emoji.fetch_packages(tmp_path / "cache")


def test_integrity_mismatch_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "PACKAGES", {"emojibase-data@17.0.0": "sha512-AAAA"})
    with pytest.raises(CartError, match="emojibase-data@17.0.0: integrity mismatch"):
        emoji.fetch_packages(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_offline", "false")
    with pytest.raises(CartError, match="npm pack emoji-datasource-twitter@16.0.0 failed"):
        emoji.fetch_packages(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
