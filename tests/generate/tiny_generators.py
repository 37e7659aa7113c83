"""Tiny random diffusers pipelines built in code and saved to folders, for the generation tests: the same
classes and loading path as real OmniGen / SDXL / IP-Adapter weights, a few thousand parameters each."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file


def omnigen(folder: Path) -> Path:
    """OmniGenPipeline: 1-layer transformer, a 4-block VAE (OmniGen assumes 16 px a token: VAE factor 8 x
    patch 2), the flow-matching scheduler of diffusers' own tests, a character-level Llama tokenizer with
    BOS 1 and padding 2 as OmniGen's processor expects."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenPipeline, OmniGenTransformer2DModel
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for ch in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(ch, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    torch.manual_seed(0)
    transformer = OmniGenTransformer2DModel(
        hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=1,
        in_channels=4, patch_size=2, time_step_dim=4, vocab_size=len(tokenizer), pad_token_id=2,
        pos_embed_max_size=64, rope_scaling={"long_factor": [1.0, 1.0], "short_factor": [1.0, 1.0]})
    vae = AutoencoderKL(sample_size=32, block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4,
                        norm_num_groups=1, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4)
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1)
    OmniGenPipeline(transformer=transformer, vae=vae, scheduler=scheduler, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def language_model(folder: Path) -> Path:
    """An instruction-tuned causal LM's folder as a user would have it: a 1-layer Llama with the
    character-level tokenizer above and a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for ch in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(ch, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def vision_language_model(folder: Path) -> Path:
    """A VLM's folder as a user would have it (LLaVA's layout): a 1-layer CLIP vision tower on 16 px
    images and a 1-layer Llama, the character-level tokenizer above with an <image> token, a chat template."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlamaTokenizer, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for ch in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(ch, len(vocab))
    vocab["<image>"] = len(vocab)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    chat = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, chat_template=chat,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)  # CLIP's class token, dropped by "default"
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                pad_token_id=2),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _clip_tokenizer_files(folder: Path) -> Path:
    """A byte-level CLIP BPE vocabulary with a few merges, <|endoftext|> the largest id as in CLIP."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(c) for c in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def sdxl_with_ip_adapter(folder: Path, adapter: Path) -> tuple[Path, Path]:
    """StableDiffusionXLPipeline (2-block UNet, two CLIP text encoders) in `folder`; a plain IP-Adapter for
    it in `adapter` laid out as h94/IP-Adapter: sdxl_models/ip-adapter_sdxl.safetensors + sdxl_models/image_encoder/."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    words = _clip_tokenizer_files(folder.parent / f"{folder.name}-vocab")
    tokenizer = CLIPTokenizer.from_pretrained(words, model_max_length=77, local_files_only=True)
    text = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), max_position_embeddings=77,
                          hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          projection_dim=32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, sample_size=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
                              tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                              image_encoder=None, feature_extractor=None, add_watermarker=False).save_pretrained(folder)

    # one to_k_ip / to_v_ip pair per cross-attention processor, ids 1, 3, 5, ... in attn_processors order
    rng = torch.Generator().manual_seed(0)
    weights, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        for part in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{key}.{part}.weight"] = 0.02 * torch.randn(hidden, 64, generator=rng)
        key += 2
    weights |= {"image_proj.proj.weight": 0.02 * torch.randn(4 * 64, 32, generator=rng),
                "image_proj.proj.bias": torch.zeros(4 * 64), "image_proj.norm.weight": torch.ones(64),
                "image_proj.norm.bias": torch.zeros(64)}
    (adapter / "sdxl_models").mkdir(parents=True, exist_ok=True)
    save_file(weights, str(adapter / "sdxl_models/ip-adapter_sdxl.safetensors"))
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, projection_dim=32, intermediate_size=37,
                                                   num_attention_heads=4, num_hidden_layers=2, image_size=32,
                                                   patch_size=8)).save_pretrained(adapter / "sdxl_models/image_encoder")
    return folder, adapter
