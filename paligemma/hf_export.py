"""Our params (big_vision layout) → a transformers PaliGemma folder: config.json + safetensors shards.

The inverse of `checkpoint.read_hf_folder`, so transformers can run the very same weights as our model
(the benchmarks compare the two that way) and a model we trained can be shared in the Hub format:

    python -m paligemma.hf_export assets/demo /tmp/demo-hf

Tensor names are the ones transformers 5 writes itself (`vision_tower.*`, `multi_modal_projector.linear.*`,
`language_model.model.*`, lm_head tied). The vocabulary is written as it is (no padding): the `<image>`
placeholder id is the first id past the table, which transformers maps to padding before its lookup.
Axis letters as in gemma.py / siglip.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Iterator

import numpy as np
from safetensors.numpy import save_file

from .config import GEMMA2_ATTN_SOFTCAP, GEMMA2_FINAL_SOFTCAP, PaliGemmaConfig

DEFAULT_SHARD_BYTES = 4 * 2**30
_VISION, _PROJECTOR, _TEXT = "vision_tower.", "multi_modal_projector.linear.", "language_model.model."
# Gemma 2's sliding window was not applied in PaliGemma 2's training; a window past any sequence turns it off.
_NO_SLIDING_WINDOW = 8192


def hf_config(cfg: PaliGemmaConfig) -> dict:
    """config.json of a transformers PaliGemmaForConditionalGeneration with this architecture.

    Raises ValueError for what transformers cannot express (a Gemma 1 query scale other than head_dim^-½,
    or soft caps other than Gemma 2's).
    """
    v, t = cfg.vision, cfg.text
    text = dict(
        hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=t.depth,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
        vocab_size=t.vocab_size, rms_norm_eps=t.eps, hidden_activation="gelu_pytorch_tanh",
        hidden_act="gelu_pytorch_tanh", rope_theta=10_000.0, max_position_embeddings=_NO_SLIDING_WINDOW,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
    )
    if t.generation == 1:
        if not np.isclose(t.query_scale, t.head_dim**-0.5) or t.attn_softcap or t.final_softcap:
            raise ValueError(f"transformers' Gemma scales queries by head_dim^-½ = {t.head_dim**-0.5:g} and has no "
                             f"soft caps; this decoder has query scale {t.query_scale:g} and caps "
                             f"{t.attn_softcap}/{t.final_softcap}, so it cannot be exported as PaliGemma 1")
        text["model_type"] = "gemma"
    else:
        if t.attn_softcap is None or t.final_softcap is None:
            raise ValueError(f"transformers' Gemma 2 always soft-caps (defaults {GEMMA2_ATTN_SOFTCAP}/"
                             f"{GEMMA2_FINAL_SOFTCAP}); this decoder has caps {t.attn_softcap}/{t.final_softcap}")
        scalar = t.query_scale**-2
        text.update(model_type="gemma2", query_pre_attn_scalar=round(scalar) if np.isclose(scalar, round(scalar)) else scalar,
                    attn_logit_softcapping=t.attn_softcap, final_logit_softcapping=t.final_softcap,
                    sliding_window=_NO_SLIDING_WINDOW)
    vision = dict(
        model_type="siglip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
        num_hidden_layers=v.depth, num_attention_heads=v.num_heads, patch_size=v.patch_size,
        image_size=v.image_size, layer_norm_eps=v.eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
        projection_dim=t.width,
    )
    return dict(
        architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma", text_config=text,
        vision_config=vision, image_token_index=t.vocab_size, vocab_size=t.vocab_size, projection_dim=t.width,
        hidden_size=t.width, tie_word_embeddings=True,
    )


def hf_tensors(params, cfg: PaliGemmaConfig) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(HF name, function giving the tensor) for every tensor, each made only when asked for."""
    img, llm = params["img"], params["llm"]
    block, text_layers = img["Transformer"]["encoderblock"], llm["layers"]
    attn, mlp = block["MultiHeadDotProductAttention_0"], block["MlpBlock_0"]
    v, t = cfg.vision, cfg.text
    a = np.asarray
    yield _VISION + "embeddings.patch_embedding.weight", lambda: a(img["embedding"]["kernel"]).transpose(3, 2, 0, 1)
    yield _VISION + "embeddings.patch_embedding.bias", lambda: a(img["embedding"]["bias"])
    yield _VISION + "embeddings.position_embedding.weight", lambda: a(img["pos_embedding"])[0]
    yield _VISION + "post_layernorm.weight", lambda: a(img["Transformer"]["encoder_norm"]["scale"])
    yield _VISION + "post_layernorm.bias", lambda: a(img["Transformer"]["encoder_norm"]["bias"])
    yield _PROJECTOR + "weight", lambda: a(img["head"]["kernel"]).T
    yield _PROJECTOR + "bias", lambda: a(img["head"]["bias"])
    for i in range(v.depth):
        p = f"{_VISION}encoder.layers.{i}."
        for theirs, ours in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
            yield p + f"{theirs}.weight", lambda i=i, o=ours: a(block[o]["scale"][i])
            yield p + f"{theirs}.bias", lambda i=i, o=ours: a(block[o]["bias"][i])
        for theirs, ours in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            yield p + f"mlp.{theirs}.weight", lambda i=i, o=ours: a(mlp[o]["kernel"][i]).T
            yield p + f"mlp.{theirs}.bias", lambda i=i, o=ours: a(mlp[o]["bias"][i])
        for theirs, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            # [W, N, Hd] -> [N·Hd, W]
            yield p + f"self_attn.{theirs}.weight", lambda i=i, o=ours: a(attn[o]["kernel"][i]).reshape(v.width, -1).T
            yield p + f"self_attn.{theirs}.bias", lambda i=i, o=ours: a(attn[o]["bias"][i]).reshape(-1)
        # [N, Hd, W] -> [W, N·Hd]
        yield p + "self_attn.out_proj.weight", lambda i=i: a(attn["out"]["kernel"][i]).reshape(-1, v.width).T
        yield p + "self_attn.out_proj.bias", lambda i=i: a(attn["out"]["bias"][i])

    yield _TEXT + "embed_tokens.weight", lambda: a(llm["embedder"]["input_embedding"])
    yield _TEXT + "norm.weight", lambda: a(llm["final_norm"]["scale"])
    heads = text_layers["attn"]
    norms = {"input_layernorm": "pre_attention_norm", "post_attention_layernorm": "pre_ffw_norm"}
    if t.post_norms:
        norms = {"input_layernorm": "pre_attention_norm", "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "pre_ffw_norm", "post_feedforward_layernorm": "post_ffw_norm"}
    for i in range(t.depth):
        p = f"{_TEXT}layers.{i}."
        # q [N, D, H] -> [N·H, D]; k, v [K, D, H] -> [K·H, D]; o [N, H, D] -> [D, N·H]
        yield p + "self_attn.q_proj.weight", lambda i=i: a(heads["q_einsum"]["w"][i]).transpose(0, 2, 1).reshape(-1, t.width)
        for c, name in enumerate(("k_proj", "v_proj")):
            yield p + f"self_attn.{name}.weight", lambda i=i, c=c: a(heads["kv_einsum"]["w"][i, c]).transpose(0, 2, 1).reshape(-1, t.width)
        yield p + "self_attn.o_proj.weight", lambda i=i: a(heads["attn_vec_einsum"]["w"][i]).reshape(-1, t.width).T
        # gating [2, D, F] -> gate, up [F, D]; linear [F, D] -> down [D, F]
        yield p + "mlp.gate_proj.weight", lambda i=i: a(text_layers["mlp"]["gating_einsum"][i, 0]).T
        yield p + "mlp.up_proj.weight", lambda i=i: a(text_layers["mlp"]["gating_einsum"][i, 1]).T
        yield p + "mlp.down_proj.weight", lambda i=i: a(text_layers["mlp"]["linear"][i]).T
        for theirs, ours in norms.items():
            yield p + f"{theirs}.weight", lambda i=i, o=ours: a(text_layers[o]["scale"][i])


def export(params, cfg: PaliGemmaConfig, folder: str | os.PathLike, tokenizer_path: str | None = None,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Writes config.json, the weights (shards of at most `max_shard_bytes`, with an index when more than one)
    and, if given, tokenizer.model into `folder`. Only one shard is held in host memory at a time."""
    folder = os.fspath(folder)
    config = hf_config(cfg)  # raises before anything is written
    os.makedirs(folder, exist_ok=True)
    shards: list[tuple[str, list[str], int]] = []  # (file, tensor names, bytes) of each written part
    shard: dict[str, np.ndarray] = {}

    def flush() -> None:
        part = f"part-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, part), metadata={"format": "pt"})
        shards.append((part, list(shard), sum(x.nbytes for x in shard.values())))
        shard.clear()

    for name, make in hf_tensors(params, cfg):
        tensor = np.ascontiguousarray(make())
        if shard and sum(x.nbytes for x in shard.values()) + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
    flush()
    _name_shards(folder, shards)
    config["dtype"] = np.dtype(params["llm"]["final_norm"]["scale"].dtype).name
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer_path:
        shutil.copy(tokenizer_path, os.path.join(folder, "tokenizer.model"))
    return folder


def _name_shards(folder: str, shards: list[tuple[str, list[str], int]]) -> None:
    """Renames the parts as transformers names shards; writes model.safetensors.index.json when there are several."""
    if len(shards) == 1:
        os.replace(os.path.join(folder, shards[0][0]), os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for number, (part, names, _) in enumerate(shards, 1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(folder, part), os.path.join(folder, final))
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": sum(size for *_, size in shards)}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def main(argv=None) -> None:
    import paligemma

    parser = argparse.ArgumentParser(prog="python -m paligemma.hf_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a model paligemma.load accepts (e.g. assets/demo)")
    parser.add_argument("out", help="folder to write the transformers PaliGemma into")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    args = parser.parse_args(argv)
    model = paligemma.load(args.source, dtype=args.dtype)
    export(model.params, model.config, args.out, model.tokenizer.path)
    print(args.out)


if __name__ == "__main__":
    main()
