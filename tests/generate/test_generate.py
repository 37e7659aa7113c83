"""`cart generate`: sub-query splitting, the Pareto selection against its definition, the preview board,
OmniGen and SDXL + IP-Adapter built tiny and run for one step through the real loading path, bad input."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_generators
from cart import train
from cart.data.images import load_rgb
from cart.errors import CartError
from cart.generate import critics, generate, generators, llm
from cart.generate.generators import OmniGen
from cart.retrieve.retriever import Retriever
from conftest import ROOT, dead_pid, prepare_run

PYTHON = sys.executable


def test_split_prompt_rule():
    assert generate.split_prompt("a cat astronaut, riding a rocket and stars with a moon") == [
        "a cat astronaut", "riding a rocket", "stars", "a moon"]
    assert generate.split_prompt("Sandwich; coffee") == ["Sandwich", "coffee"]
    assert generate.split_prompt("a grandstand") == ["a grandstand"]  # "and" inside a word does not split


def brute_force_front(scores):
    def dominates(b, a):
        return all(x >= y for x, y in zip(b, a)) and any(x > y for x, y in zip(b, a))
    return [i for i, a in enumerate(scores) if not any(dominates(b, a) for j, b in enumerate(scores) if j != i)]


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_matches_its_definition(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 12), rng.integers(1, 4)
    scores = rng.integers(-5, 0, size=(n, m)).astype(float)  # small integers: ties happen
    scores[rng.random((n, m)) < 0.3] = -np.inf  # items some sub-queries' beams did not reach
    assert generate.pareto_front(scores).tolist() == brute_force_front(scores.tolist())


@pytest.mark.parametrize("seed", range(10))
def test_chosen_images_are_on_the_front_cover_every_subquery_first_and_respect_the_cap(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(10, 3))
    scores[rng.random((10, 3)) < 0.4] = -np.inf
    scores[0, :] = [0.0, -np.inf, -np.inf]
    front = set(generate.pareto_front(scores).tolist())
    for cap in (1, 2, 3, 10):
        chosen = generate.choose_pareto(scores, cap)
        assert len(chosen) == min(cap, len(front)) and set(chosen) <= front and len(set(chosen)) == len(chosen)
        reachable = [j for j in range(3) if np.isfinite(scores[list(front), j]).any()]
        covered = {j for i in chosen[: len(reachable)] for j in range(3) if np.isfinite(scores[i, j])}
        if cap >= len(reachable):
            assert set(reachable) <= covered  # every sub-query some front item reaches gets one


def test_content_words_and_caption_matches_read_captions_only():
    assert generate.content_words("A cat, with the Rocket 3!") == {"cat", "rocket", "3"}
    records = [{"texts": [{"text": "a red cat", "kind": "caption"}, {"text": "rocket", "kind": "generated"}]},
               {"texts": [{"text": "red rocket", "kind": "query"}]},  # a held-out query text: not a caption
               {"texts": [{"text": "the cats", "kind": "caption"}]}]
    matches = generate.caption_matches(records, ["red cat", "a rocket", "the", "cat rocket"])
    assert matches.tolist() == [[True, True, False, True], [False, False, False, False], [False, False, False, False]]


@pytest.mark.parametrize("n", range(1, 7))
def test_the_grid_covers_the_simplex_without_zero_weights(n):
    parts, m = generate.simplex_grid(n)
    assert (parts >= 1).all() and (parts.sum(1) == m).all() and len(np.unique(parts, axis=0)) == len(parts)
    assert len(parts) == math.comb(m - 1, n - 1)
    assert generate.beta_bound(n) == 1 / (n * m) and generate.beta_bound(3) > 0.015  # the paper's beta fits 3


def brute_force_hybrid(matches, dense):
    """The definition: the candidates whose match pattern no other contains and exceeds, and of those
    sharing a pattern the best dense score (the first of equals)."""
    chosen = set()
    for i, s in enumerate(matches):
        if any((t >= s).all() and (t > s).any() for t in matches):
            continue
        same = [j for j, t in enumerate(matches) if (t == s).all()]
        if i == max(same, key=lambda j: (dense[j], -j)):
            chosen.add(i)
    return chosen


@pytest.mark.parametrize("seed", range(40))
def test_hybrid_selection_finds_exactly_the_pareto_optimal_candidates(seed):
    rng = np.random.default_rng(seed)
    n, count = int(rng.integers(1, 6)), int(rng.integers(1, 25))
    matches = rng.random((count, n)) < rng.uniform(0.2, 0.8)
    matches[~matches.any(1), rng.integers(0, n)] = True  # candidates match at least one sub-query
    dense = rng.integers(0, 4, count) / 3.0  # in [0, 1], ties included
    beta = 0.99 * generate.beta_bound(n)  # the largest the guarantee allows
    front = generate.hybrid_pareto(matches, dense, beta)
    assert len(front) == len(set(front)) and set(front) == brute_force_hybrid(matches, dense)
    order = generate.by_coverage(front, matches, dense)
    assert sorted(order) == sorted(front)
    for cap in range(1, len(order) + 1):  # each cut covers as many sub-queries as any choice of its first pick
        covered = matches[order[:cap]].any(0).sum()
        assert covered >= min(matches[front].any(0).sum(), max(matches[c].sum() for c in front))


@pytest.mark.parametrize("selection", ["hybrid", "generative"])
def test_preview_board_and_record_in_subquery_mode(trained, selection):
    cfg = trained("generate.mode=subqueries", "generate.subqueries=[red number 0, shape 3]", "generate.images=3",
                  f"generate.selection={selection}", f"generate.name={selection}")
    out = generate.run(cfg, prompt="red number 0 with shape 3")
    record = json.loads((out / "record.json").read_text())
    assert record["queries"] == ["red number 0", "shape 3"] and record["generator"] == "preview"
    assert record["selection"]["selection"] == selection and 1 <= len(record["retrieved"]) <= 3
    ids = {f"item{i}" for i in range(12)}
    for item in record["retrieved"]:
        assert item["id"] in ids and item["covers"] and set(item["covers"]) <= {"red number 0", "shape 3"}
        assert item["score"] == max(item["scores"].values())
    assert {q for item in record["retrieved"] for q in item["covers"]} == {"red number 0", "shape 3"}
    if selection == "hybrid":  # the captions decide: item0's "red number 0"; "shape" and "3" are in item3's
        # and item6's captions ("shape 3", "red thing 3"), the better dense score of the two is kept. Each covers
        # one sub-query, so their order is the tiny model's dense scores, which float order may swap
        chosen = {item["id"]: item for item in record["retrieved"][:2]}
        assert "item0" in chosen and len(chosen.keys() & {"item3", "item6"}) == 1
        assert chosen["item0"]["covers"] == ["red number 0"] and len(chosen["item0"]["scores"]) == 2
        assert record["selection"]["pareto_optimal"] == 2 and record["selection"]["beta"] == 0.015
    board = Image.open(record["outputs"][0])
    assert board.width >= 480 and board.getextrema() != ((255, 255), (255, 255), (255, 255))


def test_hybrid_falls_back_to_the_beams_when_no_caption_contains_a_subquery(trained, capsys):
    cfg = trained("generate.mode=subqueries", "generate.subqueries=[zebra, unicorn]", "generate.name=fallback")
    record = json.loads((generate.run(cfg, prompt="zebra and unicorn") / "record.json").read_text())
    assert record["selection"]["selection"] == "generative" and record["retrieved"]
    assert "no caption contains any sub-query" in capsys.readouterr().out


@pytest.mark.parametrize("answer, expected", [
    ('["a red cat", "a rocket"]', ["a red cat", "a rocket"]),
    ('```json\n["cat face", "moon"]\n```', ["cat face", "moon"]),
    ('Sure! Here are the sub-queries:\n1. a red cat\n2) "a rocket"\n- stars.', ["a red cat", "a rocket", "stars"]),
    ('{"subqueries": ["cat", "cat", "moon"]}', ["cat", "moon"]),
    ('Answer: [{"text": "cat"}, {"concept": "moon", "why": "x"}] hope this helps', ["cat", "moon"]),
    ('["unterminated, "list', []), ("I cannot help with that.", []), ('{"answer": "none"}', []),
    ("", []), ("[1, 2]", []), ("\n  \n", []),
    (json.dumps([str(i) for i in range(20)]), [str(i) for i in range(8)]),
    ("See [1].\n- cat\n- dog", ["cat", "dog"]),  # a stray [1] is no JSON list
])
def test_model_answers_are_read_leniently(answer, expected):
    assert llm.parse_list(answer, limit=8) == expected


class Answers:
    """A stand-in language model that gives the answers a test sets, one a call."""

    def __init__(self, *answers):
        self.answers, self.temperatures = list(answers), []

    def __call__(self, prompt, temperature=0.0, seed=0):
        self.temperatures.append(temperature)
        return self.answers.pop(0)


def test_an_unreadable_answer_is_asked_again_hotter_then_left_to_the_rule():
    model = Answers("I cannot help", '["cat face", "rocket"]')
    assert llm.ask_for_list(model, "p", 8) == (["cat face", "rocket"], ["I cannot help", '["cat face", "rocket"]'])
    assert model.temperatures == [0.0, 0.4]
    model = Answers("", "[]", "  ", "no")
    assert llm.ask_for_list(model, "p", 8) == ([], ["", "[]", "  ", "no"])
    assert model.temperatures == list(llm.TEMPERATURES) == [0.0, 0.4, 0.7, 1.0]  # a greedy answer, 3 retries


def test_a_local_language_model_writes_the_subqueries(trained, tmp_path, monkeypatch):
    folder = tiny_generators.language_model(tmp_path / "llm")
    cfg = trained("generate.mode=subqueries", f"generate.subquery_model={folder}", "generate.name=llm",
                  "generate.max_new_tokens=8")
    model = llm.TextModel(str(folder), "generate.subquery_model", max_new_tokens=8)
    assert model.chat and isinstance(model("Split: a red cat"), str)  # the real loading and generation path
    monkeypatch.setattr(llm.TextModel, "__call__", lambda self, prompt, temperature=0.0, seed=0:
                        '["red number 0", "shape 3"]' if "red number 0 and shape 3" in prompt else "")
    record = json.loads((generate.run(cfg, prompt="red number 0 and shape 3") / "record.json").read_text())
    assert record["queries"] == ["red number 0", "shape 3"] and record["selection"]["subqueries_from"] == str(folder)
    record = json.loads((generate.run(cfg, prompt="red number 1, shape 4") / "record.json").read_text())
    assert record["queries"] == ["red number 1", "shape 4"] and len(record["selection"]["answers"]) == 4
    assert record["selection"]["subqueries_from"].startswith("split rule")
    with pytest.raises(CartError, match=r"generate.subquery_model: .* has no config.json"):
        generate.run(trained("generate.mode=subqueries", f"generate.subquery_model={tmp_path}"), prompt="red")
    with pytest.raises(CartError, match="generate.subquery_prompt must contain {prompt}"):
        trained("generate.subquery_prompt=Split it")


class SetVerdicts:
    """A critic whose verdicts the test sets, one a generated image; it remembers what it was shown."""

    def __init__(self, *verdicts):
        self.verdicts, self.seen = list(verdicts), []

    def __call__(self, image, prompt, concepts):
        self.seen.append((Path(image).parent.name, concepts))
        return critics.Verdict(self.verdicts.pop(0), {"critic": "set by the test"})


@pytest.mark.parametrize("verdicts, rounds", [
    ([[("green thing", "green thing 1")], []], 2),  # missing -> retrieve -> regenerate -> nothing missing
    ([[]], 1),  # nothing missing: the first image stands
    ([None, [("shape", "shape 4")], [("shape", "shape 4")]], 3),  # cannot tell: the prompt itself; then the cap
])
def test_imagerag_loop_retrieves_what_the_critic_finds_missing(trained, monkeypatch, verdicts, rounds):
    critic = SetVerdicts(*verdicts)
    monkeypatch.setattr(critics, "load", lambda *args: critic)
    cfg = trained("generate.rounds=3", "generate.concepts=[green thing 1, shape 4]", f"generate.name=loop{rounds}")
    out = generate.run(cfg, prompt="green thing 1 with shape 4")
    record = json.loads((out / "record.json").read_text())
    assert [r["round"] for r in record["rounds"]] == list(range(1, rounds + 1)) and not critic.verdicts
    assert [folder for folder, _ in critic.seen] == [f"round-{r}" for r in range(1, rounds + 1)]
    assert critic.seen[0][1] == ["green thing 1", "shape 4"]  # the concepts it checks
    first = record["rounds"][0]
    assert first["retrieved"] == [] and first["queries"] == []  # the prompt alone
    expected_queries = {2: ["green thing 1"], 3: ["green thing 1 with shape 4", "shape 4"]}[rounds] if rounds > 1 else []
    assert [q for r in record["rounds"][1:] for q in r["queries"]] == expected_queries
    for r in record["rounds"][1:]:
        assert r["retrieved"] and all(set(item["covers"]) <= set(r["queries"]) for item in r["retrieved"])
        assert all(Path(o).parent.name == f"round-{r['round']}" and Path(o).is_file() for o in r["outputs"])
    assert record["outputs"] == record["rounds"][-1]["outputs"] and record["retrieved"] == record["rounds"][-1]["retrieved"]
    board = Image.open(record["rounds_board"])  # a row a round
    assert board.height > rounds * 128 and board.getextrema() != ((255, 255), (255, 255), (255, 255))
    assert [r["critic"]["cannot_tell"] for r in record["rounds"]] == [v is None for v in verdicts]
    assert [r["critic"]["missing"] for r in record["rounds"]] == [[list(m) for m in v or []] for v in verdicts]


def test_the_cosine_critic_compares_the_image_with_each_concept(tmp_path):
    from cart import encoders
    from cart.encoders import imagebind
    from conftest import TINY_IMAGEBIND

    imagebind_model, _ = imagebind._imagebind_package()
    torch.manual_seed(0)
    torch.save(imagebind_model.ImageBindModel(**TINY_IMAGEBIND).state_dict(), tmp_path / "ib.pth")
    tower = encoders.ImageBind(str(tmp_path / "ib.pth"), TINY_IMAGEBIND, torch.device("cpu"))
    image = tmp_path / "made.png"
    Image.new("RGB", (40, 40), "red").save(image)
    concepts = ["a red square", "a dog", "the moon"]
    cosine = (tower.encode_text(concepts) @ tower.encode([{"modality": "image", "path": str(image)}]).T).squeeze(1)
    threshold = float(cosine.median())
    verdict = critics.CosineCritic(tower, threshold)(image, "a red square, a dog, the moon", concepts)
    assert verdict.missing == [(c, c) for c, s in zip(concepts, cosine.tolist()) if s < threshold]
    assert len(verdict.missing) == 1 and verdict.said["cosine"].keys() == set(concepts)
    assert critics.CosineCritic(tower, -1.01)(image, "", concepts).missing == []  # cosines are in [-1, 1]
    assert len(critics.CosineCritic(tower, 1.01)(image, "", concepts).missing) == 3


def test_the_loop_needs_a_critic_it_can_run(trained, tmp_path):
    with pytest.raises(CartError, match="generate.critic=cosine needs a run whose encoder embeds images and text"):
        generate.run(trained("generate.rounds=2", "generate.critic=cosine"), prompt="red")
    with pytest.raises(CartError, match="generate.critic_model is empty: give the local folder of a vision-language"):
        generate.run(trained("generate.rounds=2"), prompt="red")
    with pytest.raises(CartError, match=r"generate.critic_model: .* has no config.json"):
        generate.run(trained("generate.rounds=2", f"generate.critic_model={tmp_path}"), prompt="red")
    with pytest.raises(CartError, match="generate.rounds above 1 is ImageRAG's loop, which needs mode: prompt"):
        trained("generate.rounds=2", "generate.mode=subqueries")


@pytest.mark.parametrize("answer, expected", [
    ('{"matches": true}', []),
    ('{"matches": false, "missing": []}', []),
    ('```json\n{"matches": false, "missing": [{"concept": "rocket", "description": "a red rocket in flight"}]}\n```',
     [("rocket", "a red rocket in flight")]),
    ('The image lacks: [{"concept": "cat", "description": "an orange cat"}, {"concept": "moon"}]',
     [("cat", "an orange cat"), ("moon", "moon")]),
    ('["cat", "moon"]', [("cat", "cat"), ("moon", "moon")]),
    ("- rocket: a red rocket with flames\n- cat: an orange tabby cat.", [("rocket", "a red rocket with flames"),
                                                                        ("cat", "an orange tabby cat")]),
    ("Yes, it shows everything.", []),
    ("I am not sure what to say", None), ("", None), ('{"matches": "maybe"}', None), ("[1, 2]", None),
    ("rocket: a red rocket\ncat: an orange cat", [("rocket", "a red rocket"), ("cat", "an orange cat")]),
    ("The image looks fine to me.\nNote: nothing else to say", None),
    ("Yes: the image shows a cat and a dog.", []), ("Answer: yes", []),
    ('{"matches": true, "objects": ["cat", "dog"]}', []),  # a list beside "matches": true is no verdict
    ('{"missing": [{"concept": null}]}', None), ('{"missing": [{"concept": "hat", "description": ["x"]}]}', [("hat", "hat")]),
    ("It lacks one thing [1].\n- hat: a red hat", [("hat", "a red hat")]),  # a stray [1] is no JSON verdict
    ("No. Missing:\n- hat: a red hat", [("hat", "a red hat")]),
])
def test_critic_answers_are_read_leniently(answer, expected):
    assert llm.parse_missing(answer, limit=8) == expected


def test_a_local_vlm_critic_runs_through_the_real_loading_path(tmp_path):
    folder = tiny_generators.vision_language_model(tmp_path / "vlm")
    model = llm.VisionLanguageModel(str(folder), "generate.critic_model", max_new_tokens=6)
    image = tmp_path / "made.png"
    Image.new("RGB", (40, 40), "red").save(image)
    assert isinstance(model("Does it match?", load_rgb(image)), str)
    verdict = critics.VlmCritic(model, 'Does it show "{prompt}"?')(image, "a red square", ["a red square"])
    assert 1 <= len(verdict.said["answers"]) <= 4 and verdict.said["model"] == str(folder)
    # the critic asked the model the prompt it was given, about the image, greedy first; what the model says
    # decides the verdict (a random model may say anything: read as the reader reads it)
    assert verdict.said["answers"][0] == model('Does it show "a red square"?', load_rgb(image))
    assert verdict.missing == llm.parse_missing(verdict.said["answers"][-1], critics.MAX_MISSING)


def test_both_systems_run_end_to_end_with_tiny_models(trained, tmp_path):
    """Whatever tiny random models say, `cart generate` completes and records it: ImageRAG's loop with a
    VLM critic, Cross-modal RAG with LLM-written sub-queries."""
    vlm = tiny_generators.vision_language_model(tmp_path / "vlm")
    cfg = trained("generate.rounds=2", f"generate.critic_model={vlm}", "generate.max_new_tokens=6",
                  "generate.name=tiny-vlm")
    record = json.loads((generate.run(cfg, prompt="green thing 1 and shape 4") / "record.json").read_text())
    assert 1 <= len(record["rounds"]) <= 2 and all(r["critic"]["answers"] for r in record["rounds"])
    assert Path(record["rounds_board"]).is_file()
    language = tiny_generators.language_model(tmp_path / "llm")
    cfg = trained("generate.mode=subqueries", f"generate.subquery_model={language}", "generate.max_new_tokens=6",
                  "generate.name=tiny-llm")
    record = json.loads((generate.run(cfg, prompt="red number 0 and shape 3") / "record.json").read_text())
    assert record["queries"] and record["selection"]["answers"] and record["retrieved"]


def test_the_loop_with_a_vlm_critic_retrieves_what_it_names(trained, tmp_path, monkeypatch):
    folder = tiny_generators.vision_language_model(tmp_path / "vlm")
    answers = ['{"matches": false, "missing": [{"concept": "green", "description": "green thing 1"}]}',
               "no idea", "still no idea", "?", "!", '{"matches": true}']
    monkeypatch.setattr(llm.VisionLanguageModel, "__call__", lambda self, prompt, image, temperature=0.0, seed=0:
                        answers.pop(0))
    cfg = trained("generate.rounds=3", f"generate.critic_model={folder}", "generate.name=vlm-loop")
    record = json.loads((generate.run(cfg, prompt="green thing 1 and shape 4") / "record.json").read_text())
    rounds = record["rounds"]
    assert [r["queries"] for r in rounds] == [[], ["green thing 1"], ["green thing 1 and shape 4"]] and not answers
    assert rounds[0]["critic"]["missing"] == [["green", "green thing 1"]]
    assert rounds[1]["critic"]["cannot_tell"] and len(rounds[1]["critic"]["answers"]) == 4  # then the prompt itself
    assert rounds[2]["critic"]["missing"] == [] and not rounds[2]["critic"]["cannot_tell"]


def test_prompt_mode_takes_the_concepts_in_turn(trained):
    cfg = trained("generate.concepts=[green thing 1, shape 4]", "generate.images=4", "generate.name=concepts")
    record = json.loads((generate.run(cfg, prompt="anything") / "record.json").read_text())
    assert record["mode"] == "prompt" and record["queries"] == ["green thing 1", "shape 4"]
    rows = [item["row"] for item in record["retrieved"]]
    retriever = Retriever.load(cfg.run_dir)
    first, second = ([hit.row for hit in hits] for hits in retriever.search(record["queries"], k=retriever.beam_width))
    assert rows[0] == first[0]  # the first concept's best, then the second's best (or its next, if the same)
    assert rows[1] == next(row for row in second if row != rows[0])
    assert rows[2] == next(row for row in first if row not in rows[:2])
    assert len(rows) == 4 and len(set(rows)) == 4


def test_a_generation_never_overwrites_another(trained):
    cfg = trained("generate.images=1")
    prompts = ["a cat", "A cat!", "a cat", "\U0001f431\U0001f680", "\U0001f355"]  # one slug; emoji-only: no slug
    outs = [generate.run(cfg, prompt=prompt) for prompt in prompts]
    assert len({out.name for out in outs}) == len(prompts)
    assert [out.name for out in outs[:3]] == ["a-cat", "a-cat-2", "a-cat-3"]
    for out, prompt in zip(outs, prompts):  # each folder still holds its own generation
        record = json.loads((out / "record.json").read_text())
        assert record["prompt"] == prompt and all(Path(p).parent == out and Path(p).is_file() for p in record["outputs"])
    assert not [p for p in outs[0].parent.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "."])
def test_a_generation_name_that_leaves_the_run_folder_is_refused(trained, name):
    with pytest.raises(CartError, match="generate.name must be a plain folder name"):
        trained(f"generate.name={name}")


@pytest.fixture(scope="module")
def tiny_omnigen(tmp_path_factory):
    return tiny_generators.omnigen(tmp_path_factory.mktemp("gen") / "omnigen")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return tiny_generators.sdxl_with_ip_adapter(root / "sdxl", root / "ip-adapter")


def test_omnigen_generates_with_the_retrieved_images_in_context(trained, tiny_omnigen):
    cfg = trained("generate.generator=omnigen", f"generate.model={tiny_omnigen}", "generate.images=2",
                  "generate.steps=1", "generate.height=32", "generate.width=32", "generate.name=omnigen")
    record = json.loads((generate.run(cfg, prompt="red number 0") / "record.json").read_text())
    image = Image.open(record["outputs"][0])
    assert image.size == (32, 32)
    assert record["settings"]["steps"] == 1 and record["settings"]["dtype"] == "float32" and len(record["retrieved"]) == 2
    prompt = OmniGen.in_context_prompt("a cat", [generate.Retrieved("a", "p", 0, 0.0, covers=["cat face"]),
                                                 generate.Retrieved("b", "p", 1, 0.0)])
    assert prompt == ("a cat. <img><|image_1|></img> Use only cat face in the 1st retrieved image. "
                      "<img><|image_2|></img> Use only what fits the prompt in the 2nd retrieved image.")
    assert OmniGen.in_context_prompt("a cat", []) == "a cat"
    alone = generators.load(cfg.generate).generate("a cat", [], [], 0, out_dir=Path(record["outputs"][0]).parent / "alone")
    assert Image.open(alone[0]).size == (32, 32)  # ImageRAG's first round: the prompt alone


def test_sdxl_ip_adapter_generates_from_the_best_image(trained, tiny_sdxl, monkeypatch):
    model, adapter = tiny_sdxl
    cfg = trained("generate.generator=sdxl-ip-adapter", f"generate.model={model}", f"generate.ip_adapter={adapter}",
                  "generate.steps=1", "generate.height=64", "generate.width=64", "generate.name=sdxl")
    read = []
    monkeypatch.setattr(generators, "load_rgb", lambda path: read.append(path) or load_rgb(path))
    record = json.loads((generate.run(cfg, prompt="shape 3") / "record.json").read_text())
    assert Image.open(record["outputs"][0]).size == (64, 64)
    assert record["settings"]["ip_adapter_scale"] == 0.6
    assert read == [record["retrieved"][0]["path"]]  # the adapter sees the best retrieved image, and only it
    generator = generators.load(cfg.generate)
    alone = generator.generate("a cat", [], [], 0, out_dir=Path(record["outputs"][0]).parent / "alone")
    assert Image.open(alone[0]).size == (64, 64) and len(read) == 1  # no image: the adapter silent, nothing read


def test_bad_input_is_a_clear_error(trained, tiny_omnigen, tiny_sdxl, tmp_path):
    with pytest.raises(CartError, match="empty prompt"):
        generate.run(trained(), prompt="  ")
    with pytest.raises(CartError, match="generate.subqueries must not hold an empty text"):
        trained("generate.mode=subqueries", "generate.subqueries=[shape 1, ' ']")
    with pytest.raises(CartError, match="hybrid takes at most 8 sub-queries, got 9: give fewer"):
        generate.run(trained("generate.mode=subqueries"), prompt=", ".join(f"shape {i}" for i in range(9)))
    broken = tmp_path / "omnigen"
    shutil.copytree(tiny_omnigen, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CartError, match=r"generate.model: .*omnigen lacks vae \(the pipeline needs transformer, vae"):
        generate.run(trained("generate.generator=omnigen", f"generate.model={broken}"), prompt="red")
    with pytest.raises(CartError, match="has no model_index.json"):
        generate.run(trained("generate.generator=omnigen", f"generate.model={tmp_path}"), prompt="red")
    model, adapter = tiny_sdxl
    with pytest.raises(CartError, match="ip-adapter_sdxl.safetensors not found"):
        generate.run(trained("generate.generator=sdxl-ip-adapter", f"generate.model={model}",
                             f"generate.ip_adapter={tmp_path}"), prompt="red")


def test_a_corpus_without_images_retrieves_nothing_to_generate_from(tmp_path, monkeypatch):
    config = prepare_run(tmp_path, modality="audio")
    train.run(config("train.epochs=1"))
    with pytest.raises(CartError, match=r"no images retrieved for 'red' \(found only audio items\)"):
        generate.run(config("train.epochs=1"), prompt="red")
    # ImageRAG's loop keeps what it made: the round that finds no image ends the loop, and the record says so
    monkeypatch.setattr(critics, "load", lambda *args: SetVerdicts([("red", "red thing 1")]))
    record = json.loads((generate.run(config("train.epochs=1", "generate.rounds=3"), prompt="red") / "record.json")
                        .read_text())
    assert len(record["rounds"]) == 1 and record["rounds"][0]["stopped"] == "no images retrieved for red thing 1"
    assert Path(record["outputs"][0]).is_file() and Path(record["rounds_board"]).is_file()


def test_cli_generate_with_subqueries(trained):
    run_dir = trained().run_dir
    done = subprocess.run([PYTHON, "-m", "cart", "generate", "red thing 1 and shape 2", "--run", str(run_dir),
                           "--config", str(ROOT / "configs/tiny.yaml"), "--split", "generate.name=cli"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((run_dir / "generations/cli/record.json").read_text())
    assert record["mode"] == "subqueries" and record["queries"] == ["red thing 1", "shape 2"]
    bad = subprocess.run([PYTHON, "-m", "cart", "generate", "", "--run", str(run_dir)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "cart generate: error: empty prompt: give the text to generate from"


def test_what_a_killed_generation_left_is_cleared_and_its_name_reused(trained):
    parent = trained().run_dir / "generations"
    parent.mkdir(exist_ok=True)
    (parent / "killed").mkdir()  # the empty folder an older cart reserved before it was killed
    leftover = parent / f".killed.tmp-{dead_pid()}"
    leftover.mkdir()
    (leftover / "generated.png").write_bytes(b"half")
    out = generate.run(trained("generate.name=killed"), prompt="red")
    assert out == parent / "killed" and (out / "record.json").is_file() and not leftover.exists()
    again = generate.run(trained("generate.name=killed"), prompt="red")  # never over an earlier generation
    assert again == parent / "killed-2"
    record = json.loads((again / "record.json").read_text())
    assert all(Path(p).is_file() and Path(p).parent == again for p in record["outputs"])
    assert not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_a_prompt_the_model_cannot_read_is_warned_of(trained, capsys):
    generate.run(trained("generate.name=unread"), prompt="\U0001f431\U0001f680")
    assert ("cart generate: warning: the model's tokenizer knows no word of the query '\U0001f431\U0001f680'"
            in capsys.readouterr().err)
    generate.run(trained("generate.name=read"), prompt="red thing 1")
    assert "warning" not in capsys.readouterr().err
