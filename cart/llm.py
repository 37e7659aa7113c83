"""Local language models that write for `cart generate`, and the reading of what they write.

Cross-modal RAG has an LLM split the prompt into sub-queries (GPT-4o-mini in the paper); here any
instruction-tuned causal LM a user has in a local folder does it, through transformers' `text-generation`
pipeline (`from_pretrained(dir, local_files_only=True)`: never a download). A model's answer is free text,
so `parse_list` reads it leniently: a JSON list, a JSON object holding one, or a bulleted or numbered
list, without the quotes and brackets models add. An answer that still yields nothing is asked again at a higher
temperature (`TEMPERATURES`, as ImageRAG retries its VLM), then the caller falls back to its own rule.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from cart.devices import pick_device
from cart.errors import CartError

TEMPERATURES = (0.0, 0.7, 1.0)  # the first answer greedy, then two retries that sample
BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)]|\(\d+\))\s*")
FENCE = re.compile(r"```(?:json)?\s*(.*?)```", flags=re.DOTALL)


def parse_list(answer: str, limit: int) -> list[str]:
    """The short texts an answer lists, in order, without repeats, at most `limit`: a JSON list of strings
    (or of objects, their first string value), a JSON object whose first list value is one, or else the
    lines that start with a bullet or a number. [] when the answer lists nothing usable."""
    answer = answer.strip()
    fenced = FENCE.search(answer)
    data = _first_json(fenced.group(1) if fenced else answer)
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if isinstance(data, list):
        texts = [x if isinstance(x, str) else next((v for v in x.values() if isinstance(v, str)), "")
                 if isinstance(x, dict) else "" for x in data]
    else:  # the lines a list marker starts: prose ("I cannot help with that") lists nothing
        texts = [BULLET.sub("", line) for line in answer.splitlines() if BULLET.match(line)]
    cleaned = [t.strip().strip("\"'`[]{}").strip().rstrip(".,;") for t in texts]
    unique = list(dict.fromkeys(t for t in cleaned if t and len(t) <= 200 and not t.endswith(":")))
    return unique[:limit]


def _first_json(text: str):
    """The first JSON list or object inside `text`, or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            return decoder.raw_decode(text[match.start():])[0]
        except json.JSONDecodeError:
            continue
    return None


class TextModel:
    """An instruction-tuned causal LM from a local folder: `model(prompt, temperature, seed)` -> its answer.
    A chat template, when the tokenizer has one, wraps the prompt as a user turn."""

    def __init__(self, folder: str, key: str, device: str = "auto", max_new_tokens: int = 128):
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        path = Path(folder).expanduser()
        if not folder:
            raise CartError(f"{key} is empty: give the local folder of an instruction-tuned language model")
        if not (path / "config.json").is_file():
            raise CartError(f"{key}: {path} has no config.json: not a transformers model folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CartError(f"{key}: {path} does not load as a causal language model: {str(e).splitlines()[0]}") from None
        self.folder, self.max_new_tokens = str(path), max_new_tokens
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device=pick_device(device))

    def __call__(self, prompt: str, temperature: float = 0.0, seed: int = 0) -> str:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        text = [{"role": "user", "content": prompt}] if self.chat else prompt
        out = self.pipe(text, max_new_tokens=self.max_new_tokens, return_full_text=False,
                        pad_token_id=self.pipe.tokenizer.pad_token_id or self.pipe.tokenizer.eos_token_id,
                        **sampling)[0]["generated_text"]
        return out[-1]["content"] if isinstance(out, list) else out


def ask_for_list(model, prompt: str, limit: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Ask `model` until its answer lists something (`TEMPERATURES`): (the list, [] if no answer did;
    every answer given, for the record)."""
    answers = []
    for attempt, temperature in enumerate(TEMPERATURES):
        answers.append(model(prompt, temperature=temperature, seed=seed + attempt))
        items = parse_list(answers[-1], limit)
        if items:
            return items, answers
    return [], answers
