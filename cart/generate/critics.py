"""ImageRAG's check (`generate.rounds` >= 2): does a generated image show the prompt, and if not, what is missing.

A critic takes the generated image, the prompt and the prompt's concepts (`generate.concepts`, else the
prompt split by rule) and returns a `Verdict`: the missing concepts, each with the description to retrieve
images for, or None when it cannot tell (the loop then retrieves for the prompt itself, as ImageRAG does).

- `vlm` (the paper's, GPT-4o there): a local VLM folder (`generate.critic_model`) sees the image and
  `generate.critic_prompt`; its answer is read by `llm.parse_missing` (a JSON verdict, or concept lines),
  asked again hotter when it says nothing readable, and the critic cannot tell after four answers.
- `cosine` needs no VLM: the run's own encoder, when it embeds images and text in one space (ImageBind),
  embeds the generated image and each concept; a concept whose cosine is under `generate.critic_threshold`
  is missing, and is its own description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cart.data.images import load_rgb
from cart.errors import CartError
from cart.generate import llm
from cart.settings import EmbedConfig, GenerateConfig

MAX_MISSING = 8  # concepts read from a verdict


@dataclass
class Verdict:
    missing: list[tuple[str, str]] | None  # (concept, description to retrieve for); None: the critic cannot tell
    said: dict = field(default_factory=dict)  # what the critic said or measured, for record.json


class CosineCritic:
    def __init__(self, encoder, threshold: float):
        self.encoder, self.threshold = encoder, threshold

    def __call__(self, image: Path, prompt: str, concepts: list[str]) -> Verdict:
        with torch.no_grad():
            seen = self.encoder.encode([{"id": "generated", "modality": "image", "path": str(image)}])  # (1, D)
            cosine = (self.encoder.encode_text(concepts) @ seen.T).squeeze(1).tolist()
        return Verdict([(c, c) for c, s in zip(concepts, cosine) if s < self.threshold],
                       {"critic": "cosine", "threshold": self.threshold,
                        "cosine": {c: round(s, 4) for c, s in zip(concepts, cosine)}})


class VlmCritic:
    def __init__(self, model, prompt: str, seed: int = 0):
        self.model, self.prompt, self.seed = model, prompt, seed

    def __call__(self, image: Path, prompt: str, concepts: list[str]) -> Verdict:
        picture, question = load_rgb(image), self.prompt.replace("{prompt}", prompt)
        missing, answers = llm.ask(lambda t, s: self.model(question, picture, temperature=t, seed=s),
                                   lambda a: llm.parse_missing(a, MAX_MISSING), self.seed)
        return Verdict(missing, {"critic": "vlm", "model": getattr(self.model, "folder", ""), "answers": answers})


def load(g: GenerateConfig, embed: EmbedConfig | None, device: torch.device, seed: int = 0):
    """The critic `generate.critic` names; `embed`: how the run's items were embedded (the cosine critic's)."""
    if g.critic == "vlm":
        model = llm.VisionLanguageModel(g.critic_model, "generate.critic_model", str(device), g.max_new_tokens)
        return VlmCritic(model, g.critic_prompt, seed)
    if g.critic == "cosine":
        from cart import encoders

        if embed.encoder != "imagebind":
            raise CartError(f"generate.critic=cosine needs a run whose encoder embeds images and text in one space "
                            f"(imagebind); this run's is {embed.encoder}")
        return CosineCritic(encoders.load(embed, device), g.critic_threshold)
    raise CartError(f"generate.critic={g.critic!r} is unknown (vlm, cosine)")
