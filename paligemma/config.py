"""Model variants, read from checkpoint shapes (and a HF config.json where shapes say too little).

The variant is never guessed from a file name: every dimension comes from the weights themselves, so
published checkpoints and the small test/demo configs go through one code path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or whose tensors fit no PaliGemma variant."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT: pre-LayerNorm blocks, learned position embedding, no class token."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Gemma (generation 1) or Gemma 2 decoder."""

    vocab_size: int = 257152
    width: int = 2048
    depth: int = 18
    mlp_dim: int = 16384
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    query_scale: float = 256**-0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    post_norms: bool = False  # Gemma 2's extra RMSNorms after attention and after the MLP
    eps: float = 1e-6

    @property
    def generation(self) -> int:
        return 2 if self.post_norms else 1


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def describe(self) -> str:
        """A short human name such as 'PaliGemma 2 · Gemma 2 2B · 224px'."""
        size = _KNOWN_DECODERS.get((self.text.generation, self.text.width), "custom")
        family = f"PaliGemma {self.text.generation}"
        return f"{family} · Gemma{' 2' if self.text.generation == 2 else ''} {size} · {self.image_size}px"


# (generation, width) -> the published decoder size; the 27B model scales queries by (width/heads)^-1/2.
_KNOWN_DECODERS = {(1, 2048): "2B", (2, 2304): "2B", (2, 3584): "9B", (2, 4608): "27B"}
_QUERY_SCALE_BY_WIDTH_PER_HEAD = {(2, 4608)}

GEMMA2_ATTN_SOFTCAP = 50.0
GEMMA2_FINAL_SOFTCAP = 30.0


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"the checkpoint has no tensor '{key}', which every PaliGemma checkpoint has")
    return tuple(shapes[key])


def config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], overrides: Mapping[str, object] | None = None
) -> PaliGemmaConfig:
    """Derives the config from tensor shapes keyed by our big_vision-style names (without 'params/').

    `overrides` carries what shapes cannot tell (from a HF config.json): query_scale, softcaps, eps.
    Raises CheckpointError when the shapes are inconsistent with any PaliGemma layout.
    """
    overrides = dict(overrides or {})
    kernel = _shape(shapes, "img/embedding/kernel")  # [P, P, 3, W]
    pos = _shape(shapes, "img/pos_embedding")  # [1, n, W]
    if len(kernel) != 4 or kernel[0] != kernel[1] or kernel[2] != 3:
        raise CheckpointError(f"img/embedding/kernel has shape {kernel}; expected [patch, patch, 3, width]")
    patch, width = kernel[0], kernel[3]
    side = math.isqrt(pos[1]) if len(pos) == 3 else 0
    if len(pos) != 3 or side * side != pos[1] or pos[2] != width:
        raise CheckpointError(f"img/pos_embedding has shape {pos}; expected [1, (res/{patch})², {width}]")
    block = "img/Transformer/encoderblock/"
    query = _shape(shapes, block + "MultiHeadDotProductAttention_0/query/kernel")  # [L, W, N, Hd]
    mlp = _shape(shapes, block + "MlpBlock_0/Dense_0/kernel")  # [L, W, M]
    if len(query) != 4 or query[1] != width or query[2] * query[3] != width:
        raise CheckpointError(
            f"image attention query kernel has shape {query}; expected [depth, {width}, heads, {width}/heads]"
        )
    vision = VisionConfig(
        width=width,
        depth=query[0],
        mlp_dim=mlp[2],
        num_heads=query[2],
        patch_size=patch,
        image_size=side * patch,
        eps=float(overrides.get("vision_eps", 1e-6)),
    )

    embed = _shape(shapes, "llm/embedder/input_embedding")  # [V, D]
    q = _shape(shapes, "llm/layers/attn/q_einsum/w")  # [L, N, D, H]
    kv = _shape(shapes, "llm/layers/attn/kv_einsum/w")  # [L, 2, K, D, H]
    gating = _shape(shapes, "llm/layers/mlp/gating_einsum")  # [L, 2, D, F]
    head = _shape(shapes, "img/head/kernel")  # [W, D]
    d = embed[1]
    if len(q) != 4 or q[2] != d or len(kv) != 5 or kv[1] != 2 or kv[3] != d or kv[4] != q[3] or q[1] % kv[2]:
        raise CheckpointError(
            f"decoder attention shapes q {q}, kv {kv} do not fit width {d}: expected q [depth, heads, {d}, head_dim] "
            f"and kv [depth, 2, kv_heads, {d}, head_dim] with heads a multiple of kv_heads"
        )
    if len(gating) != 4 or gating[2] != d or head != (width, d):
        raise CheckpointError(f"MLP {gating} or projection {head} shapes do not fit widths {width}→{d}")
    generation = 2 if "llm/layers/post_attention_norm/scale" in shapes else 1
    num_heads, head_dim = q[1], q[3]
    if "query_scale" in overrides:
        query_scale = float(overrides["query_scale"])
    elif (generation, d) in _QUERY_SCALE_BY_WIDTH_PER_HEAD:
        query_scale = (d / num_heads) ** -0.5
    else:
        query_scale = head_dim**-0.5
    text = TextConfig(
        vocab_size=embed[0],
        width=d,
        depth=q[0],
        mlp_dim=gating[3],
        num_heads=num_heads,
        num_kv_heads=kv[2],
        head_dim=head_dim,
        query_scale=query_scale,
        attn_softcap=overrides.get("attn_softcap", GEMMA2_ATTN_SOFTCAP if generation == 2 else None),
        final_softcap=overrides.get("final_softcap", GEMMA2_FINAL_SOFTCAP if generation == 2 else None),
        post_norms=generation == 2,
        eps=float(overrides.get("text_eps", 1e-6)),
    )
    return PaliGemmaConfig(vision=vision, text=text)


def overrides_from_hf_config(hf_config: Mapping[str, object]) -> dict[str, object]:
    """What a transformers config.json says that the tensor shapes cannot.

    Absent or null fields keep the model's defaults (the 2024 PaliGemma 1 files write few); an activation other
    than the tanh-approximated GELU every PaliGemma uses, under any of its names, is refused.
    """
    text = {k: v for k, v in dict(hf_config.get("text_config") or {}).items() if v is not None}
    vision = {k: v for k, v in dict(hf_config.get("vision_config") or {}).items() if v is not None}
    _check_activations(text, vision)
    out: dict[str, object] = {}
    if text.get("model_type", "gemma") == "gemma2":
        if "query_pre_attn_scalar" in text:
            out["query_scale"] = float(text["query_pre_attn_scalar"]) ** -0.5
        raw = dict(hf_config.get("text_config") or {})  # here an explicit null means "no cap"
        out["attn_softcap"] = raw.get("attn_logit_softcapping", GEMMA2_ATTN_SOFTCAP)
        out["final_softcap"] = raw.get("final_logit_softcapping", GEMMA2_FINAL_SOFTCAP)
    if "rms_norm_eps" in text:
        out["text_eps"] = float(text["rms_norm_eps"])
    if "layer_norm_eps" in vision:
        out["vision_eps"] = float(vision["layer_norm_eps"])
    return out


# Names transformers has used for the tanh-approximated GELU (Gemma 1 configs said "gelu" and meant it).
_GELU_TANH_NAMES = {"gelu_pytorch_tanh", "gelu_fast", "gelu_new", "gelu_approximate", "gelu"}


def _check_activations(text: Mapping[str, object], vision: Mapping[str, object]) -> None:
    for where, fields in (("text_config", text), ("vision_config", vision)):
        for key in ("hidden_activation", "hidden_act"):
            if key in fields and fields[key] not in _GELU_TANH_NAMES:
                raise CheckpointError(
                    f"{where}.{key} is {fields[key]!r}; PaliGemma uses the tanh GELU "
                    f"({', '.join(sorted(_GELU_TANH_NAMES))})"
                )


def demo_config(vocab_size: int) -> PaliGemmaConfig:
    """The embedded demo model: a small SigLIP (224px, 28px patches -> 64 image tokens) + Gemma, ~7 M params,
    sized to train on a 2-core CPU in under an hour. Every query head has its own key/value head: with one
    shared 64-wide value per layer (Gemma 2B's multi-query layout), too little of each image token reaches the
    text positions to carry four box edges."""
    return PaliGemmaConfig(
        vision=VisionConfig(width=192, depth=4, mlp_dim=768, num_heads=4, patch_size=28, image_size=224),
        text=TextConfig(
            vocab_size=vocab_size,
            width=256,
            depth=4,
            mlp_dim=1024,
            num_heads=4,
            num_kv_heads=4,
            head_dim=64,
            query_scale=64**-0.5,
        ),
    )


def tiny_config(vocab_size: int) -> PaliGemmaConfig:
    """A seconds-to-train config for smoke tests of the training loop."""
    return PaliGemmaConfig(
        vision=VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=28, image_size=56),
        text=TextConfig(
            vocab_size=vocab_size,
            width=64,
            depth=2,
            mlp_dim=128,
            num_heads=2,
            num_kv_heads=1,
            head_dim=32,
            query_scale=32**-0.5,
        ),
    )


# The architectures `python -m paligemma.train --config NAME` builds when training from scratch.
CONFIGS = {"demo": demo_config, "tiny": tiny_config}
