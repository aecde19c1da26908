"""The config.json field sets published on the Hub resolve to the right architectures, from shapes alone.

Field sets:
- PaliGemma 1 (google/paligemma-3b-{pt,mix}-{224,448,896}, May 2024): as copied into transformers'
  src/transformers/models/colpali/convert_colpali_weights_to_hf.py ("Copied from
  https://huggingface.co/vidore/colpali-v1.2-merged/blob/main/config.json", a google/paligemma-3b-pt-448
  derivative): no head_dim, no activation names in text_config, num_image_tokens, top-level vocab_size and
  hidden_size, projector_hidden_act "gelu_fast". The 224 files also omit vision image_size (SigLIP's default).
- PaliGemma 2 (google/paligemma2-{3b,10b,28b}-pt-{224,448,896}, Dec 2024): written by transformers'
  src/transformers/models/paligemma/convert_paligemma2_weights_to_hf.py (VARIANT_CONFIGS and
  get_paligemma2_config), saved as the difference from Gemma2Config's defaults: so the 3B text_config has no
  num_attention_heads/head_dim (defaults 8/256), the 10B none of head_dim; a stale top-level hidden_size 2048.
Each resolves through published.architecture -> params.expected_shapes -> config.config_from_shapes, the same
validation as real weights, without any tensor data (the 28B case costs nothing).
"""

import pytest

from paligemma import published
from paligemma.config import CheckpointError, PaliGemmaConfig
from paligemma.params import expected_shapes


def paligemma1(resolution: int) -> dict:
    tokens = (resolution // 14) ** 2
    vision = {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "num_image_tokens": tokens,
        "patch_size": 14,
        "projection_dim": 2048,
        "projector_hidden_act": "gelu_fast",
        "vision_use_head": False,
    }
    if resolution != 224:
        vision["image_size"] = resolution
    return {
        "_name_or_path": "",
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "eos_token_id": 1,
        "hidden_size": 2048,
        "ignore_index": -100,
        "image_token_index": 257152,
        "model_type": "paligemma",
        "pad_token_id": 0,
        "projection_dim": 2048,
        "text_config": {
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "model_type": "gemma",
            "num_attention_heads": 8,
            "num_hidden_layers": 18,
            "num_image_tokens": tokens,
            "num_key_value_heads": 1,
            "torch_dtype": "float32",
            "vocab_size": 257216,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.41.0.dev0",
        "vision_config": vision,
        "vocab_size": 257216,
    }


# Per decoder: (hidden_size, layers, mlp, kv heads, heads or None when the default 8, head_dim or None, scalar)
_PG2 = {
    "3b": (2304, 26, 9216, 4, None, None, 256),
    "10b": (3584, 42, 14336, 8, 16, None, 256),
    "28b": (4608, 46, 36864, 16, 32, 128, 144),
}


def paligemma2(size: str, resolution: int) -> dict:
    width, layers, mlp, kv, heads, head_dim, scalar = _PG2[size]
    tokens = (resolution // 14) ** 2
    text = {
        "architectures": ["Gemma2ForCausalLM"],
        "eos_token_id": [1, 107],
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": width,
        "intermediate_size": mlp,
        "model_type": "gemma2",
        "num_hidden_layers": layers,
        "num_image_tokens": tokens,
        "num_key_value_heads": kv,
        "query_pre_attn_scalar": scalar,
        "torch_dtype": "bfloat16",
        "vocab_size": 257152,
    }
    if heads:
        text["num_attention_heads"] = heads
    if head_dim:
        text["head_dim"] = head_dim
    return {
        "_vocab_size": 257152,
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "eos_token_id": 1,
        "hidden_size": 2048,
        "image_token_index": 257152,
        "model_type": "paligemma",
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "projection_dim": width,
        "text_config": text,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.47.0.dev0",
        "vision_config": {
            "hidden_size": 1152,
            "image_size": resolution,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "num_image_tokens": tokens,
            "num_positions": 256,
            "patch_size": 14,
            "projection_dim": width,
            "torch_dtype": "bfloat16",
            "vision_use_head": False,
        },
    }


# (config, expected name, decoder width, depth, heads, kv heads, head_dim, query scale)
CASES = [(f"paligemma-3b-pt-{r}", paligemma1(r), r, (1, 2048, 18, 8, 1, 256, 256**-0.5)) for r in (224, 448, 896)] + [
    (f"paligemma2-{s}-pt-{r}", paligemma2(s, r), r, (2, *dims))
    for r in (224, 448, 896)
    for s, dims in (
        ("3b", (2304, 26, 8, 4, 256, 256**-0.5)),
        ("10b", (3584, 42, 16, 8, 256, 256**-0.5)),
        ("28b", (4608, 46, 32, 16, 128, 144**-0.5)),
    )
]


@pytest.mark.parametrize("name, hf_config, resolution, text", CASES, ids=[c[0] for c in CASES])
def test_published_config_resolves_to_its_architecture(name, hf_config, resolution, text):
    cfg = published.architecture(hf_config)
    t = cfg.text
    assert (t.generation, t.width, t.depth, t.num_heads, t.num_kv_heads, t.head_dim) == text[:6]
    assert t.query_scale == pytest.approx(text[6])
    assert cfg.image_size == resolution and cfg.num_image_tokens == (resolution // 14) ** 2
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.patch_size) == (1152, 27, 14)
    assert t.vocab_size == (257216 if t.generation == 1 else 257152)
    assert (t.attn_softcap, t.final_softcap) == ((None, None) if t.generation == 1 else (50.0, 30.0))


def test_shapes_of_the_28b_check_out_without_data():
    cfg = published.architecture(paligemma2("28b", 896))
    shapes = expected_shapes(cfg)
    assert shapes["llm/layers/attn/q_einsum/w"] == (46, 32, 4608, 128)
    assert shapes["img/pos_embedding"] == (1, 4096, 1152)
    assert isinstance(cfg, PaliGemmaConfig)


def test_an_activation_no_paligemma_uses_is_refused():
    config = paligemma2("3b", 224)
    config["text_config"]["hidden_activation"] = "silu"
    with pytest.raises(CheckpointError, match="tanh GELU"):
        published.architecture(config)
