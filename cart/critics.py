"""ImageRAG's check (`generate.rounds` >= 2): does a generated image show the prompt, and if not, what is missing.

A critic takes the generated image, the prompt and the prompt's concepts (`generate.concepts`, else the
prompt split by rule) and returns a `Verdict`: the missing concepts, each with the description to retrieve
images for, or None when it cannot tell (the loop then retrieves for the prompt itself, as ImageRAG does).

- `cosine` needs no VLM: the run's own encoder, when it embeds images and text in one space (ImageBind),
  embeds the generated image and each concept; a concept whose cosine is under `generate.critic_threshold`
  is missing, and is its own description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cart.config import EmbedConfig, GenerateConfig
from cart.errors import CartError


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


def load(g: GenerateConfig, embed: EmbedConfig, device: torch.device):
    """The critic `generate.critic` names, for a run whose items were embedded with `embed`."""
    if g.critic == "cosine":
        from cart import encoders

        if embed.encoder != "imagebind":
            raise CartError(f"generate.critic=cosine needs a run whose encoder embeds images and text in one space "
                            f"(imagebind); this run's is {embed.encoder}")
        return CosineCritic(encoders.load(embed, device), g.critic_threshold)
    raise CartError(f"generate.critic={g.critic!r} is unknown (cosine)")
