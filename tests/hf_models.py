"""Tiny transformers PaliGemma models with random weights, written to disk in the published formats.

Shared by the parity and loading tests: one place builds the reference model every check compares with.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

# HF pads the table past the tokenizer (257152 -> 257216 in the published models); so do we.
VOCAB_PADDING = 64


def build_hf_model(generation: int, image_size: int, tokenizer_size: int, seed: int = 0):
    """A small PaliGemma 1 (Gemma) or 2 (Gemma 2, GQA, soft caps, extra norms) with spread-out random weights."""
    torch.manual_seed(seed)
    text = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1 if generation == 1 else 2,
        head_dim=16,
        vocab_size=tokenizer_size + VOCAB_PADDING,
        hidden_activation="gelu_pytorch_tanh",
        hidden_act="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
    )
    if generation == 1:
        text["model_type"] = "gemma"
    else:
        text.update(
            model_type="gemma2",
            query_pre_attn_scalar=24,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=4096,
        )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
        image_size=image_size,
        vision_use_head=False,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer_size,
        vocab_size=tokenizer_size + VOCAB_PADDING,
        projection_dim=64,
        hidden_size=64,
    )
    model = PaliGemmaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if "norm" in name else 0.3 if "embed" in name else 0.15
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model


def save_hf_folder(model, folder: str, tokenizer_path: str) -> str:
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(tokenizer_path, os.path.join(folder, "tokenizer.model"))
    return folder


# The namings a published or transformers-written PaliGemma folder may use (vision, projector, text).
NAMINGS = {
    "hub-2024": ("vision_tower.vision_model.", "multi_modal_projector.linear.", "language_model.model."),
    "transformers-4": (
        "model.vision_tower.vision_model.",
        "model.multi_modal_projector.linear.",
        "model.language_model.",
    ),
}


def _split_name(key: str) -> tuple[int, str] | None:
    """(part index, name within the part) of a tensor name in any naming; None for the tied lm_head."""
    key = key.removeprefix("model.")
    for index, part in enumerate(("vision_tower.", "multi_modal_projector.linear.", "language_model.")):
        if key.startswith(part):
            rest = key[len(part) :]
            return index, rest.removeprefix("vision_model.").removeprefix("model.")
    return None


def rename_keys(src: str, dst: str, naming: str) -> str:
    """A copy of an HF folder whose tensors use one of NAMINGS."""
    shutil.copytree(src, dst)
    prefixes = NAMINGS[naming]
    for name in os.listdir(dst):
        if name.endswith(".safetensors"):
            path = os.path.join(dst, name)
            renamed = {}
            for key, value in load_file(path).items():
                split = _split_name(key)
                if split is not None:
                    renamed[prefixes[split[0]] + split[1]] = value
            save_file(renamed, path, metadata={"format": "pt"})
    return dst


def hf_inputs(model, pixels: np.ndarray, prompt_ids: list[int]):
    """input_ids / pixel_values / token_type_ids as the PaliGemma processor builds them (image tokens first)."""
    n = model.config.text_config.num_image_tokens
    ids = [model.config.image_token_id] * n + list(prompt_ids)
    return dict(
        input_ids=torch.tensor([ids]),
        pixel_values=torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy()),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        token_type_ids=torch.zeros(1, len(ids), dtype=torch.long),
    )
