"""The architecture a Hugging Face `config.json` describes, without any tensor: for fit-before-fetch and for
checking that published config files resolve to the right variant.

The 2024 PaliGemma 1 files leave out what transformers fills in from its defaults (no `head_dim`, no vision
`image_size`, `num_image_tokens` instead); PaliGemma 2 files carry a stale top-level `hidden_size`. So every
missing field takes transformers' default for its `model_type`, the image side comes from `num_image_tokens`
when present, and only `text_config` / `vision_config` are trusted for sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .config import (
    CheckpointError,
    PaliGemmaConfig,
    TextConfig,
    VisionConfig,
    config_from_shapes,
    overrides_from_hf_config,
)
from .params import expected_shapes

# transformers' defaults for the fields the published files may omit.
_TEXT_DEFAULTS = {
    "gemma": dict(
        vocab_size=256000,
        hidden_size=3072,
        intermediate_size=24576,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=256,
    ),
    "gemma2": dict(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
    ),
}
_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=224
)


def architecture(hf_config: Mapping[str, object]) -> PaliGemmaConfig:
    """The PaliGemmaConfig of a transformers PaliGemma config.json, through the same shape checks as weights."""
    text, vision = dict(hf_config.get("text_config") or {}), dict(hf_config.get("vision_config") or {})
    kind = text.get("model_type", "gemma")
    if kind not in _TEXT_DEFAULTS:
        raise CheckpointError(f"text_config.model_type is {kind!r}; PaliGemma decoders are 'gemma' or 'gemma2'")
    t = {**_TEXT_DEFAULTS[kind], **{k: v for k, v in text.items() if v is not None}}
    if "vocab_size" not in text and "vocab_size" in hf_config:  # PaliGemma 1 repeats it at the top level
        t["vocab_size"] = hf_config["vocab_size"]
    v = {**_VISION_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
    tokens = vision.get("num_image_tokens") or text.get("num_image_tokens")
    if tokens:
        side = math.isqrt(int(tokens))
        if side * side != int(tokens):
            raise CheckpointError(f"num_image_tokens {tokens} is not a square number of patches")
        v["image_size"] = side * int(v["patch_size"])
    draft = PaliGemmaConfig(
        VisionConfig(
            width=int(v["hidden_size"]),
            depth=int(v["num_hidden_layers"]),
            mlp_dim=int(v["intermediate_size"]),
            num_heads=int(v["num_attention_heads"]),
            patch_size=int(v["patch_size"]),
            image_size=int(v["image_size"]),
        ),
        TextConfig(
            vocab_size=int(t["vocab_size"]),
            width=int(t["hidden_size"]),
            depth=int(t["num_hidden_layers"]),
            mlp_dim=int(t["intermediate_size"]),
            num_heads=int(t["num_attention_heads"]),
            num_kv_heads=int(t["num_key_value_heads"]),
            head_dim=int(t["head_dim"]),
            post_norms=kind == "gemma2",
        ),
    )
    return config_from_shapes(expected_shapes(draft), overrides_from_hf_config(hf_config))
