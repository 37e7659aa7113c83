"""Local language models that write for `cart generate`, and the reading of what they write.

Cross-modal RAG has an LLM split the prompt into sub-queries (GPT-4o-mini in the paper), ImageRAG a VLM
say what a generated image misses (GPT-4o); here any instruction-tuned model a user has in a local folder
does it, through transformers' `text-generation` (`TextModel`) or `image-text-to-text` pipeline
(`VisionLanguageModel`), `from_pretrained(dir, local_files_only=True)`: never a download. An answer is
free text, so it is read leniently: `parse_list` takes a JSON list, a JSON object holding one, or a
bulleted or numbered list; `parse_missing` a JSON verdict, a list of concepts, or "concept: description"
lines, one a line. An answer that yields nothing usable is asked again at a higher temperature
(`TEMPERATURES`, as ImageRAG retries its VLM), then the caller falls back to its own rule.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

from cart.devices import pick_device
from cart.errors import CartError

TEMPERATURES = (0.0, 0.4, 0.7, 1.0)  # the first answer greedy, then up to three retries, hotter each time
BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)]|\(\d+\))\s*")
FENCE = re.compile(r"```(?:json)?\s*(.*?)```", flags=re.DOTALL)
YES = re.compile(r"\s*(?:(?:answer|verdict)\s*:\s*)?[\"'`*]*yes\b", flags=re.IGNORECASE)  # "it matches"
CONCEPT = re.compile(r"^[\w][\w '-]*$")  # a concept names a thing: words, no punctuation of prose or JSON
NOT_CONCEPTS = {"yes", "no", "answer", "note", "verdict", "missing", "matches"}  # labels of prose, not concepts


def parse_list(answer: str, limit: int) -> list[str]:
    """The short texts an answer lists, in order, without repeats, at most `limit`: a JSON list of strings
    (or of objects, their first string value), a JSON object whose first list value is one, or else the
    lines that start with a bullet or a number. [] when the answer lists nothing usable."""
    data = _json_in(answer)
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), None)
    texts = []
    if isinstance(data, list):
        texts = [x if isinstance(x, str) else next((v for v in x.values() if isinstance(v, str)), "")
                 if isinstance(x, dict) else "" for x in data]
    if not any(isinstance(t, str) and t.strip() for t in texts):  # no JSON list of texts: the list markers'
        texts = [BULLET.sub("", line) for line in answer.splitlines() if BULLET.match(line)]  # (prose: nothing)
    cleaned = [t.strip().strip("\"'`[]{}").strip().rstrip(".,;") for t in texts]
    unique = list(dict.fromkeys(t for t in cleaned if t and len(t) <= 200 and not t.endswith(":")))
    return unique[:limit]


def _json_in(answer: str):
    """The first JSON list or object of an answer (inside a ```json fence when there is one), or None."""
    fenced = FENCE.search(answer)
    return _first_json(fenced.group(1) if fenced else answer)


def _first_json(text: str):
    """The first JSON list or object inside `text`, or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            return decoder.raw_decode(text[match.start():])[0]
        except json.JSONDecodeError:
            continue
    return None


class LocalModel:
    """A transformers pipeline (`TASK`) over a model in a local folder, its parts (`PARTS`: argument ->
    Auto class) loaded with local files only; `key` names the setting in errors."""

    TASK, WHAT, PARTS = "", "", {}

    def __init__(self, folder: str, key: str, device: str = "auto", max_new_tokens: int = 128):
        import transformers

        path = _model_folder(folder, key, self.WHAT)
        try:
            parts = {name: getattr(transformers, auto).from_pretrained(path, local_files_only=True)
                     for name, auto in self.PARTS.items()}
        except (OSError, ValueError) as e:
            raise CartError(f"{key}: {path} does not load as {self.WHAT}: {str(e).splitlines()[0]}") from None
        self.folder, self.max_new_tokens = str(path), max_new_tokens
        self.pipe = transformers.pipeline(self.TASK, **parts, device=pick_device(device))


class TextModel(LocalModel):
    """An instruction-tuned causal LM: `model(prompt, temperature, seed)` -> its answer. A chat template,
    when the tokenizer has one, wraps the prompt as a user turn."""

    TASK, WHAT = "text-generation", "an instruction-tuned language model"
    PARTS = {"model": "AutoModelForCausalLM", "tokenizer": "AutoTokenizer"}

    @property
    def chat(self) -> bool:
        return bool(getattr(self.pipe.tokenizer, "chat_template", None))

    def __call__(self, prompt: str, temperature: float = 0.0, seed: int = 0) -> str:
        text = [{"role": "user", "content": prompt}] if self.chat else prompt
        out = self.pipe(text, max_new_tokens=self.max_new_tokens, return_full_text=False,
                        pad_token_id=self.pipe.tokenizer.pad_token_id or self.pipe.tokenizer.eos_token_id,
                        **_sampling(temperature, seed))[0]["generated_text"]
        return out[-1]["content"] if isinstance(out, list) else out


def ask(answer: Callable[[float, int], str], read: Callable[[str], object], seed: int = 0) -> tuple[object, list[str]]:
    """`answer(temperature, seed)` until `read` finds something in it (`TEMPERATURES`): (read's first result
    that is not None, else None; every answer given, for the record)."""
    answers = []
    for attempt, temperature in enumerate(TEMPERATURES):
        answers.append(answer(temperature, seed + attempt))
        found = read(answers[-1])
        if found is not None:
            return found, answers
    return None, answers


def ask_for_list(model, prompt: str, limit: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A list from `model` (`parse_list`): (the list, [] if no answer had one; every answer given)."""
    found, answers = ask(lambda t, s: model(prompt, temperature=t, seed=s), lambda a: parse_list(a, limit) or None,
                         seed)
    return found or [], answers


def parse_missing(answer: str, limit: int) -> list[tuple[str, str]] | None:
    """A critic's verdict: the (concept, description) pairs it names missing, [] when it says the image
    matches, None when the answer says neither. Read: an answer that starts with "yes"; a JSON object
    ({"matches": true}, or a list under "missing" of objects with "concept" and "description", or of
    strings); a JSON list of those; else "concept: description" lines (bulleted, or one a line with nothing
    else)."""
    if YES.match(answer):
        return []
    data = _json_in(answer)
    if isinstance(data, dict):
        if data.get("matches") is True or data.get("match") is True:
            return []
        if "missing" in data and not data["missing"]:
            return []
        data = data.get("missing", next((v for v in data.values() if isinstance(v, list)), None))
    pairs = [_pair(x) for x in data] if isinstance(data, list) else []
    if not any(c for c, _ in pairs):  # no JSON verdict: "concept: description" lines
        lines = [(bool(BULLET.match(line)), BULLET.sub("", line).split(":", 1)) for line in answer.splitlines()
                 if line.strip()]
        found = [(bulleted, part[0], part[1]) for bulleted, part in lines
                 if len(part) == 2 and CONCEPT.match(part[0].strip()) and len(part[0].split()) <= 6
                 and part[0].strip().lower() not in NOT_CONCEPTS]
        if len(found) < len(lines):  # prose around them: only the bulleted lines count
            found = [f for f in found if f[0]]
        pairs = [(c, d) for _, c, d in found]
    pairs = [(c.strip().strip("\"'`"), d.strip().strip("\"'`").rstrip(".")) for c, d in pairs]
    return list(dict.fromkeys((c, d or c) for c, d in pairs if c))[:limit] or None


def _pair(item) -> tuple[str, str]:
    """(concept, description) from a listed item: an object's "concept" / "description" strings (else its
    first two strings), or a string for both; ("", "") for anything else."""
    if isinstance(item, str):
        return item, item
    if isinstance(item, dict):
        strings = [v for v in item.values() if isinstance(v, str)]
        concept = item.get("concept") if isinstance(item.get("concept"), str) else (strings[0] if strings else "")
        description = item.get("description") if isinstance(item.get("description"), str) else \
            (strings[1] if len(strings) > 1 else concept)
        return concept, description
    return "", ""


class VisionLanguageModel(LocalModel):
    """A VLM (transformers' `image-text-to-text`): `model(prompt, image, temperature, seed)` -> its answer
    about the image."""

    TASK, WHAT = "image-text-to-text", "a vision-language model"
    PARTS = {"model": "AutoModelForImageTextToText", "processor": "AutoProcessor"}

    def __call__(self, prompt: str, image, temperature: float = 0.0, seed: int = 0) -> str:
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        out = self.pipe(text=messages, max_new_tokens=self.max_new_tokens, return_full_text=False,
                        generate_kwargs=_sampling(temperature, seed))[0]["generated_text"]
        return out[-1]["content"] if isinstance(out, list) else out


def _sampling(temperature: float, seed: int) -> dict:
    """generate's arguments for an answer at `temperature` (0: greedy), the draw seeded."""
    torch.manual_seed(seed)
    return {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}


def _model_folder(folder: str, key: str, what: str) -> Path:
    """The local model folder `key` names, or a one-line error."""
    if not folder:
        raise CartError(f"{key} is empty: give the local folder of {what}")
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise CartError(f"{key}: {path} has no config.json: not a transformers model folder")
    return path
