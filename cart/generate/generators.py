"""Image generators that take retrieved images as conditions (`generate.generator`).

- `preview`: no model. A PNG board: the prompt, the retrieved images with their scores and, in sub-query
  mode, the sub-queries each one covers. Runs anywhere; the demo's generator.
- `omnigen`: diffusers' OmniGenPipeline from a local folder, the retrieved images in context (the prompt
  gets OmniGen's `<img><|image_k|></img>` placeholders), up to `generate.images` of them.
- `sdxl-ip-adapter`: diffusers' StableDiffusionXLPipeline from a local folder with an IP-Adapter from
  another local folder; the best retrieved image is the image prompt, `generate.ip_adapter_scale` its weight.

Model folders load with `from_pretrained(dir, local_files_only=True)`: never a download. A folder that lacks
a part the pipeline needs is a one-line error naming it. CUDA when present (fp16 for SDXL, bf16 for
OmniGen), else the CPU in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from cart import files
from cart.data.images import load_rgb
from cart.devices import pick_device
from cart.errors import CartError
from cart.settings import GenerateConfig


def load(g: GenerateConfig):
    if g.generator == "preview":
        return Preview(g)
    if g.generator == "omnigen":
        return OmniGen(g)
    if g.generator == "sdxl-ip-adapter":
        return SdxlIpAdapter(g)
    raise CartError(f"generate.generator={g.generator!r} is unknown (preview, omnigen, sdxl-ip-adapter)")


def pipeline_folder(path: str, key: str, needs: tuple[str, ...]) -> Path:
    """A diffusers pipeline folder holding `needs` (component subfolders), or a clear error."""
    if not path:
        raise CartError(f"{key} is empty: give the local folder of the pipeline (see docs/generate.md)")
    folder = Path(path).expanduser()
    if not (folder / "model_index.json").is_file():
        raise CartError(f"{key}: {folder} has no model_index.json: not a diffusers pipeline folder")
    missing = [part for part in needs if not (folder / part).is_dir()]
    if missing:
        raise CartError(f"{key}: {folder} lacks {', '.join(missing)} (the pipeline needs {', '.join(needs)})")
    return folder


def _device_dtype(g: GenerateConfig, cuda_dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    device = pick_device(g.device)
    if g.dtype != "auto":
        return device, getattr(torch, g.dtype)
    return device, cuda_dtype if device.type == "cuda" else torch.float32


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _write_images(images: list[Image.Image], out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)  # a round's own folder in ImageRAG's loop
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"{stem}_{i}.png"
        with files.atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    return paths


class Preview:
    def __init__(self, g: GenerateConfig):
        self.g = g

    def settings(self) -> dict:
        return {"thumbnail": self.g.thumbnail}

    def generate(self, prompt: str, subqueries: list[str], images, seed: int, out_dir: Path) -> list[Path]:
        """The board: the prompt, a column per retrieved image (thumbnail, id, best score) and, with
        sub-queries, their matrix: a row per sub-query, "[x]" where the image covers it (its captions
        contain it, or its beams found it), and the image's score for it."""
        size, pad, line = self.g.thumbnail, 12, 14
        font = ImageFont.load_default(size=14)
        small = ImageFont.load_default(size=11)
        label = min(180, max(len(q) for q in subqueries) * 7 + pad) if subqueries else 0  # the rows' names
        rows = len(subqueries) if subqueries else max([1, *(len(r.covers) for r in images)])
        width = pad + label + len(images) * (size + pad)
        height = 3 * pad + 24 + size + (rows + 2) * line
        board = Image.new("RGB", (max(width, 480), height), "white")
        draw = ImageDraw.Draw(board)
        draw.text((pad, pad), f"prompt: {prompt}", fill="black", font=font)
        top = pad + 24
        if not images:  # ImageRAG's first round: the prompt alone
            draw.text((pad, top), "no retrieved images: generated from the prompt alone", fill="#888", font=small)
        matrix_top = top + size + 4 + 2 * line
        for j, query in enumerate(subqueries):
            draw.text((pad, matrix_top + j * line), query[: label // 6], fill="black", font=small)
        for i, item in enumerate(images):
            left = pad + label + i * (size + pad)
            _thumbnail(board, draw, item.path, left, top, size, "#999")
            for n, text in enumerate([item.id, f"score {item.score:.2f}"]):
                draw.text((left, top + size + 4 + n * line), text[: size // 6], fill="black", font=small)
            for n, query in enumerate(subqueries or item.covers):  # its column of the matrix, or what it covers
                covered = query in item.covers
                score = f" {item.scores[query]:.2f}" if query in item.scores else ""
                text = f"{'[x]' if covered else '[ ]'}{score}" if subqueries else f"covers: {query}"
                draw.text((left, matrix_top + n * line), text[: size // 6], fill="#2a2" if covered else "#888",
                          font=small)
        return _write_images([board], out_dir, "board")


def rounds_board(prompt: str, rounds: list[dict], path: Path, size: int = 128) -> Path:
    """ImageRAG's loop on one board, a row a round: the images retrieved for it (and for what), the image
    generated from them, and the critic's verdict on it (what is missing, or that it matches)."""
    pad, line = 12, 14
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    widest = max([1, *(len(r["retrieved"]) for r in rounds)])  # "the prompt alone" takes a slot too
    width = pad + 70 + (widest + 1) * (size + pad) + 260
    height = pad + 24 + len(rounds) * (size + 3 * line + pad)
    board = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(board)
    draw.text((pad, pad), f"prompt: {prompt}", fill="black", font=font)
    for i, r in enumerate(rounds):
        top = pad + 24 + i * (size + 3 * line + pad)
        draw.text((pad, top), f"round {r['round']}", fill="black", font=font)
        left = pad + 70
        for item in r["retrieved"]:  # what this round was conditioned on
            _thumbnail(board, draw, item["path"], left, top, size, "#999")
            draw.text((left, top + size + 2), f"for: {', '.join(item['covers'])}"[: size // 6], fill="#2a2", font=small)
            left += size + pad
        if not r["retrieved"]:
            draw.text((left, top + size // 2), "the prompt alone", fill="#888", font=small)
            left += size + pad
        _thumbnail(board, draw, r["outputs"][0], left, top, size, "black")  # what it generated
        critic = r["critic"]
        verdict = (["critic: cannot tell"] if critic["cannot_tell"] else ["critic: it matches"] if not critic["missing"]
                   else ["critic: missing"] + [f"  {concept}: {description}" for concept, description in critic["missing"]])
        for n, text in enumerate(verdict[:8]):
            draw.text((left + size + pad, top + n * line), text[:40], fill="#a22" if critic["missing"] else "black",
                      font=small)
    with files.atomic_path(path) as tmp:
        board.save(tmp, format="PNG")
    return path


def _thumbnail(board: Image.Image, draw: ImageDraw.ImageDraw, path, left: int, top: int, size: int, outline: str):
    thumb = ImageOps.contain(load_rgb(path), (size, size))  # up or down to fit
    board.paste(thumb, (left + (size - thumb.width) // 2, top + (size - thumb.height) // 2))
    draw.rectangle([left - 1, top - 1, left + size, top + size], outline=outline)


class OmniGen:
    """OmniGen with the retrieved images in context, each told what to take from it (`in_context_prompt`)."""

    def __init__(self, g: GenerateConfig):
        from diffusers import OmniGenPipeline

        folder = pipeline_folder(g.model, "generate.model", ("transformer", "vae", "scheduler", "tokenizer"))
        self.g = g
        self.device, self.dtype = _device_dtype(g, torch.bfloat16)
        self.pipe = OmniGenPipeline.from_pretrained(folder, local_files_only=True, dtype=self.dtype).to(self.device)
        self.pipe.set_progress_bar_config(leave=False)

    def settings(self) -> dict:
        g = self.g
        return {"model": g.model, "steps": g.steps, "guidance": g.guidance, "image_guidance": g.image_guidance,
                "height": g.height, "width": g.width, "images": g.images, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch.")}

    @staticmethod
    def in_context_prompt(prompt: str, images) -> str:
        """Cross-modal RAG's subquery-aware prompt: the prompt, then per image "<image k> Use only [what it
        covers] in [the k-th retrieved image]" (the whole image where it covers nothing named)."""
        references = " ".join(f"<img><|image_{k}|></img> Use only {', '.join(item.covers) or 'what fits the prompt'} "
                              f"in the {_ordinal(k)} retrieved image." for k, item in enumerate(images, 1))
        return f"{prompt}. {references}" if images else prompt

    def generate(self, prompt: str, subqueries: list[str], images, seed: int, out_dir: Path) -> list[Path]:
        g = self.g
        images = images[: g.images]
        result = self.pipe(prompt=self.in_context_prompt(prompt, images),
                           input_images=[load_rgb(item.path) for item in images] or None,
                           height=g.height, width=g.width, num_inference_steps=g.steps, guidance_scale=g.guidance,
                           img_guidance_scale=g.image_guidance,
                           generator=torch.Generator(self.device).manual_seed(seed))
        return _write_images(result.images, out_dir, "omnigen")


class SdxlIpAdapter:
    def __init__(self, g: GenerateConfig):
        from diffusers import StableDiffusionXLPipeline

        folder = pipeline_folder(g.model, "generate.model",
                                 ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"))
        adapter = Path(g.ip_adapter).expanduser()
        weights = adapter / g.ip_adapter_subfolder / g.ip_adapter_weights
        if not g.ip_adapter or not weights.is_file():
            raise CartError(f"generate.ip_adapter: {weights} not found (the IP-Adapter weights file)")
        encoder = adapter / g.ip_adapter_subfolder / "image_encoder"
        if not (encoder / "config.json").is_file():
            raise CartError(f"generate.ip_adapter: {encoder} has no config.json (the adapter's CLIP image encoder)")
        self.g = g
        self.device, self.dtype = _device_dtype(g, torch.float16)
        self.pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, dtype=self.dtype)
        self.pipe.load_ip_adapter(str(adapter), subfolder=g.ip_adapter_subfolder, weight_name=g.ip_adapter_weights,
                                  image_encoder_folder="image_encoder", local_files_only=True)
        self.pipe.set_ip_adapter_scale(g.ip_adapter_scale)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(leave=False)

    def settings(self) -> dict:
        g = self.g
        return {"model": g.model, "ip_adapter": g.ip_adapter, "ip_adapter_weights": g.ip_adapter_weights,
                "ip_adapter_scale": g.ip_adapter_scale, "steps": g.steps, "guidance": g.guidance,
                "height": g.height, "width": g.width, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch.")}

    def generate(self, prompt: str, subqueries: list[str], images, seed: int, out_dir: Path) -> list[Path]:
        g = self.g
        # no image yet (ImageRAG's first round): the adapter silent, on a blank image prompt
        self.pipe.set_ip_adapter_scale(g.ip_adapter_scale if images else 0.0)
        image = load_rgb(images[0].path) if images else Image.new("RGB", (g.width, g.height), "white")
        result = self.pipe(prompt=prompt, ip_adapter_image=image, height=g.height, width=g.width,
                           num_inference_steps=g.steps, guidance_scale=g.guidance,
                           generator=torch.Generator(self.device).manual_seed(seed))
        return _write_images(result.images, out_dir, "sdxl")
