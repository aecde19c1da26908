"""The one correspondence between Hugging Face PaliGemma tensors and ours, read in both directions.

checkpoint.py reads it HF -> ours (loading a transformers folder), hf_export.py ours -> HF (writing one).
Each entry names our big_vision key, the HF name(s) within one part of the model, and the layout change:

  - HF Linear weights are [out, in], ours [in, out]: a transpose;
  - attention weights split HF's heads·head_dim axis into (heads, head_dim), then permute axes;
  - HF names with "{i}" are per layer; ours stack them on a leading axis L;
  - two HF names (k/v, gate/up) fill one of ours with a pair axis C after L;
  - Gemma 2 has two more norms per layer and renames one (see `entries`).

HF names are relative to a part prefix: the 2024 Hub checkpoints ('vision_tower.vision_model.',
'language_model.model.'), transformers 4.5x ('model.vision_tower.vision_model.', 'model.language_model.')
and 5.x ('vision_tower.') spell the prefixes differently; each part is found by a tensor only it has.
Axis letters as in gemma.py / siglip.py (W vision width, Hd vision head dim, P patches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from .config import CheckpointError

VISION, PROJECTOR, TEXT = "vision", "projector", "text"  # the parts; VISION and TEXT also name head counts
KV = "kv"  # the decoder's kv head count
# what export writes: the names transformers 5 writes itself
EXPORT_PREFIXES = {VISION: "vision_tower.", PROJECTOR: "multi_modal_projector.linear.", TEXT: "language_model.model."}
# the tensor that finds each part's prefix on load, and what follows the found prefix
_PART_MARKERS = {
    VISION: ("post_layernorm.weight", ""),
    PROJECTOR: ("multi_modal_projector.linear.weight", "multi_modal_projector.linear."),
    TEXT: ("embed_tokens.weight", ""),
}
# where each part's per-layer tensors are numbered
LAYER_PREFIXES = {VISION: "encoder.layers.", TEXT: "layers."}


class LayoutError(CheckpointError):
    """An HF tensor whose shape does not fit its layout (the loader adds the tensor's name)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """HF -> ours for one (per-layer) tensor: split HF axis `split` into (heads, rest), then permute to `perm`.

    `heads` names a head count (VISION, TEXT, KV) or is a number; ours -> HF undoes both steps.
    """

    perm: tuple[int, ...] | None = None
    split: int | None = None
    heads: str | int = 1

    def _split_shape(self, shape: tuple[int, ...], head_counts: Mapping[str, int]) -> tuple[int, ...]:
        if self.split is None:
            return tuple(shape)
        n = self.heads if isinstance(self.heads, int) else head_counts[self.heads]
        if shape[self.split] % n:
            raise LayoutError(f"shape {tuple(shape)}: axis {self.split} does not split into {n} heads")
        return (*shape[: self.split], n, shape[self.split] // n, *shape[self.split + 1 :])

    def shape_to_ours(self, shape: tuple[int, ...], head_counts: Mapping[str, int]) -> tuple[int, ...]:
        split = self._split_shape(shape, head_counts)
        return split if self.perm is None else tuple(split[a] for a in self.perm)

    def to_ours(self, x: np.ndarray, head_counts: Mapping[str, int]) -> np.ndarray:
        x = x.reshape(self._split_shape(x.shape, head_counts))
        return x if self.perm is None else x.transpose(self.perm)

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        x = y if self.perm is None else y.transpose(np.argsort(self.perm))
        if self.split is None:
            return x
        a = self.split
        return x.reshape(*x.shape[:a], x.shape[a] * x.shape[a + 1], *x.shape[a + 2 :])


SAME = Layout()
TRANSPOSE = Layout(perm=(1, 0))  # Linear [out, in] -> [in, out]


@dataclasses.dataclass(frozen=True)
class Entry:
    ours: str  # our "/"-joined key
    part: str  # VISION, PROJECTOR or TEXT: the prefix the HF names follow
    hf: tuple[str, ...]  # one HF name, or two filling a pair axis C; "{i}" marks a per-layer name
    layout: Layout = SAME

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf[0]

    @property
    def pair(self) -> bool:
        return len(self.hf) > 1

    def hf_names(self, prefix: str, layer: int | None = None) -> list[str]:
        return [prefix + name.format(i=layer) for name in self.hf]


def _entry(ours: str, part: str, *hf: str, layout: Layout = SAME) -> Entry:
    return Entry(ours, part, hf, layout)


def _vision_entries() -> list[Entry]:
    block, layer = "img/Transformer/encoderblock/", LAYER_PREFIXES[VISION] + "{i}."
    attn = block + "MultiHeadDotProductAttention_0/"
    patches = Layout(perm=(2, 3, 1, 0))  # conv [O, I, kh, kw] -> [kh, kw, I, O]
    positions = Layout(split=0, heads=1)  # [P, W] -> [1, P, W]
    qkv = Layout(split=0, heads=VISION, perm=(2, 0, 1))  # [N·Hd, W] -> [N, Hd, W] -> [W, N, Hd]
    qkv_bias = Layout(split=0, heads=VISION)  # [N·Hd] -> [N, Hd]
    out_proj = Layout(split=1, heads=VISION, perm=(1, 2, 0))  # [W, N·Hd] -> [W, N, Hd] -> [N, Hd, W]
    out = [
        _entry("img/embedding/kernel", VISION, "embeddings.patch_embedding.weight", layout=patches),
        _entry("img/embedding/bias", VISION, "embeddings.patch_embedding.bias"),
        _entry("img/pos_embedding", VISION, "embeddings.position_embedding.weight", layout=positions),
        _entry("img/Transformer/encoder_norm/scale", VISION, "post_layernorm.weight"),
        _entry("img/Transformer/encoder_norm/bias", VISION, "post_layernorm.bias"),
        _entry("img/head/kernel", PROJECTOR, "weight", layout=TRANSPOSE),
        _entry("img/head/bias", PROJECTOR, "bias"),
    ]
    for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        out += [
            _entry(f"{block}{ours}/scale", VISION, f"{layer}{theirs}.weight"),
            _entry(f"{block}{ours}/bias", VISION, f"{layer}{theirs}.bias"),
        ]
    for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        out += [
            _entry(f"{block}MlpBlock_0/{ours}/kernel", VISION, f"{layer}mlp.{theirs}.weight", layout=TRANSPOSE),
            _entry(f"{block}MlpBlock_0/{ours}/bias", VISION, f"{layer}mlp.{theirs}.bias"),
        ]
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out += [
            _entry(f"{attn}{ours}/kernel", VISION, f"{layer}self_attn.{theirs}.weight", layout=qkv),
            _entry(f"{attn}{ours}/bias", VISION, f"{layer}self_attn.{theirs}.bias", layout=qkv_bias),
        ]
    out += [
        _entry(attn + "out/kernel", VISION, f"{layer}self_attn.out_proj.weight", layout=out_proj),
        _entry(attn + "out/bias", VISION, f"{layer}self_attn.out_proj.bias"),
    ]
    return out


def _text_entries(post_norms: bool) -> list[Entry]:
    layer, attn = LAYER_PREFIXES[TEXT] + "{i}.", "llm/layers/attn/"
    hf_attn, hf_mlp = layer + "self_attn.", layer + "mlp."
    q = Layout(split=0, heads=TEXT, perm=(0, 2, 1))  # [N·H, D] -> [N, H, D] -> [N, D, H]
    kv = Layout(split=0, heads=KV, perm=(0, 2, 1))  # k and v each [K·H, D] -> [K, D, H]; ours [L, 2, K, D, H]
    o = Layout(split=1, heads=TEXT, perm=(1, 2, 0))  # [D, N·H] -> [D, N, H] -> [N, H, D]
    out = [
        _entry("llm/embedder/input_embedding", TEXT, "embed_tokens.weight"),
        _entry("llm/final_norm/scale", TEXT, "norm.weight"),
        _entry(attn + "q_einsum/w", TEXT, hf_attn + "q_proj.weight", layout=q),
        _entry(attn + "kv_einsum/w", TEXT, hf_attn + "k_proj.weight", hf_attn + "v_proj.weight", layout=kv),
        _entry(attn + "attn_vec_einsum/w", TEXT, hf_attn + "o_proj.weight", layout=o),
        # gate and up each [F, D] -> [D, F]; ours [L, 2, D, F]
        _entry(
            "llm/layers/mlp/gating_einsum",
            TEXT,
            hf_mlp + "gate_proj.weight",
            hf_mlp + "up_proj.weight",
            layout=TRANSPOSE,
        ),
        _entry("llm/layers/mlp/linear", TEXT, hf_mlp + "down_proj.weight", layout=TRANSPOSE),
    ]
    if post_norms:  # Gemma 2: a norm before and after both attention and MLP
        norms = {
            "pre_attention_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "pre_ffw_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        }
    else:  # Gemma: HF calls the norm before the MLP "post attention"
        norms = {"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"}
    out += [_entry(f"llm/layers/{ours}/scale", TEXT, f"{layer}{theirs}.weight") for ours, theirs in norms.items()]
    return out


def entries(post_norms: bool) -> list[Entry]:
    """Every tensor of a PaliGemma with a Gemma (post_norms False) or Gemma 2 (True) decoder."""
    return _vision_entries() + _text_entries(post_norms)


def has_post_norms(names: Iterable[str], text_prefix: str) -> bool:
    """Whether an HF checkpoint's decoder is Gemma 2 (it has the extra norms)."""
    return f"{text_prefix}{LAYER_PREFIXES[TEXT]}0.pre_feedforward_layernorm.weight" in set(names)


def find_prefixes(names: Iterable[str], source: str) -> dict[str, str]:
    """The prefix of each part's names in an HF checkpoint, whichever naming it uses."""
    names = list(names)
    prefixes = {}
    for part, (marker, after) in _PART_MARKERS.items():
        found = [n[: -len(marker)] for n in names if n.endswith(marker)]
        if len(found) != 1:
            raise CheckpointError(
                f"{source}: expected one '*{marker}' tensor of the {part} part of a PaliGemma checkpoint "
                f"(e.g. 'vision_tower.vision_model.post_layernorm.weight'), found {len(found)}"
            )
        prefixes[part] = found[0] + after
    return prefixes
